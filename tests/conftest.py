"""A real PostgreSQL for every test, found in the order of SPEC §7.

1. ``CHUNKD_TEST_DSN``: a server you run (a role that may create databases);
2. testcontainers, when a Docker engine answers a ping within 2 s;
3. a throwaway cluster from local server binaries (run as an unprivileged user under root).

Each test gets its own database cloned from a migrated template. With ``CI`` set, finding no
Postgres fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import ClusterError, PostgresCluster

TEMPLATE_DB = "chunkd_test_template"


@dataclass
class PgServer:
    """Where the test databases live; ``cluster`` is set only when we manage the server."""

    admin_dsn: str
    cluster: PostgresCluster | None = None

    def dsn(self, dbname: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{dbname}"))


def _docker_dsn() -> tuple[str, contextlib.AbstractContextManager[object]] | None:
    try:
        import docker  # type: ignore[import-untyped]
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        # Without a short probe a silent Docker socket blocks for 60 s.
        docker.from_env(timeout=2).ping()
    except Exception:
        return None
    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    return container.get_connection_url(), contextlib.closing(_Stopper(container))


class _Stopper:
    def __init__(self, container: object) -> None:
        self._container = container

    def close(self) -> None:
        self._container.stop()  # type: ignore[attr-defined]


def _no_postgres(reason: str) -> None:
    message = f"no PostgreSQL for the tests: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get("CHUNKD_TEST_DSN")
    if external:
        yield PgServer(admin_dsn=external)
        return
    docker = _docker_dsn()
    if docker is not None:
        dsn, stopper = docker
        with stopper:
            yield PgServer(admin_dsn=dsn)
        return
    try:
        cluster = PostgresCluster(fsync=False)
        cluster.start()
    except ClusterError as exc:
        _no_postgres(str(exc))
        return
    try:
        yield PgServer(admin_dsn=cluster.dsn("postgres"), cluster=cluster)
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def managed_cluster(pg_server: PgServer) -> PostgresCluster:
    """For fault tests that restart Postgres: only possible on a cluster we started."""
    if pg_server.cluster is None:
        pytest.fail(
            "this fault test restarts PostgreSQL, which needs the throwaway cluster, "
            "not CHUNKD_TEST_DSN or a container",
            pytrace=False,
        )
    return pg_server.cluster


async def _admin(pg_server: PgServer) -> asyncpg.Connection:
    return await connect(pg_server.admin_dsn)


@pytest.fixture(scope="session")
async def template_db(pg_server: PgServer) -> str:
    admin = await _admin(pg_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    conn = await connect(pg_server.dsn(TEMPLATE_DB))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return TEMPLATE_DB


@dataclass
class TestDatabase:
    name: str
    dsn: str
    server: PgServer


@pytest.fixture
async def database(pg_server: PgServer, template_db: str) -> AsyncIterator[TestDatabase]:
    """A fresh migrated database for one test, dropped afterwards (connections and all)."""
    name = f"chunkd_test_{uuid.uuid4().hex[:12]}"
    admin = await _admin(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}" STRATEGY FILE_COPY')
    finally:
        await admin.close()
    try:
        yield TestDatabase(name=name, dsn=pg_server.dsn(name), server=pg_server)
    finally:
        # The server may have been restarted by a fault test: retry the drop briefly.
        for _ in range(50):
            try:
                admin = await _admin(pg_server)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await admin.close()
                break
            except Exception:
                await asyncio.sleep(0.1)


@pytest.fixture
async def empty_database(pg_server: PgServer) -> AsyncIterator[str]:
    """The DSN of a fresh database without the chunkd schema (for `chunkd migrate` itself)."""
    name = f"chunkd_empty_{uuid.uuid4().hex[:12]}"
    admin = await _admin(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield pg_server.dsn(name)
    finally:
        admin = await _admin(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def conn(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    connection = await connect(database.dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """``conn``, with the table the handlers of ``daemon_handlers`` record their runs in."""
    from daemon_handlers import EXECUTIONS_DDL

    await conn.execute(EXECUTIONS_DDL)
    return conn


@pytest.fixture
async def pool(database: TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    from chunkd.db import create_pool

    p = await create_pool(database.dsn, size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def start(database: TestDatabase, tmp_path):  # type: ignore[no-untyped-def]
    """Starts real ``chunkd run`` subprocesses on the test database; all killed at teardown."""
    from daemon_helpers import Daemon

    daemons: list[Daemon] = []

    def _start(
        *args: str,
        dsn: str | None = None,
        env: dict[str, str] | None = None,
        log_level: str = "debug",
    ) -> Daemon:
        log_path = tmp_path / f"daemon{len(daemons)}.log"
        daemon = Daemon(dsn or database.dsn, log_path, *args, env=env, log_level=log_level)
        daemons.append(daemon)
        return daemon

    yield _start
    for daemon in daemons:
        daemon.kill()  # SIGKILL also ends a daemon a test left stopped with SIGSTOP


@pytest.fixture
def start_web(database: TestDatabase, tmp_path):  # type: ignore[no-untyped-def]
    """Starts real ``chunkd web`` subprocesses on the test database; all killed at teardown."""
    from web_helpers import WebProcess

    servers: list[WebProcess] = []

    def _start(*args: str, dsn: str | None = None, env: dict[str, str] | None = None) -> WebProcess:
        server = WebProcess(
            dsn or database.dsn, tmp_path / f"web{len(servers)}.log", *args, env=env
        )
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.kill()
