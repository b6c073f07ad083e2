"""A real PostgreSQL for every test: the server of chunkd's own pytest plugin
(``chunkd.testing``, SPEC §7), found in this order:

1. ``CHUNKD_TEST_DSN``: a server you run (a role that may create databases);
2. a throwaway cluster from local server binaries (run as an unprivileged user under root),
   or those of the embedded extra;
3. testcontainers, when a Docker engine answers a ping within 2 s.

Each test gets its own database cloned from a migrated template. With ``CI`` set, finding no
Postgres fails the run instead of skipping it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.demo.cluster import PostgresCluster
from chunkd.testing.server import TestServer, create_database, drop_database

# The plugin's session server is the suite's too.
PgServer = TestServer


@pytest.fixture(scope="session")
def pg_server(chunkd_server: TestServer) -> TestServer:
    return chunkd_server


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


@dataclass
class TestDatabase:
    name: str
    dsn: str
    server: PgServer


@pytest.fixture
async def database(pg_server: PgServer) -> AsyncIterator[TestDatabase]:
    """A fresh migrated database for one test, dropped afterwards (connections and all; the
    server may have been restarted by a fault test: the drop waits for it)."""
    name = await create_database(pg_server)
    try:
        yield TestDatabase(name=name, dsn=pg_server.dsn(name), server=pg_server)
    finally:
        await drop_database(pg_server, name)


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
        log_format: str = "json",
    ) -> Daemon:
        log_path = tmp_path / f"daemon{len(daemons)}.log"
        daemon = Daemon(
            dsn or database.dsn, log_path, *args, env=env, log_level=log_level,
            log_format=log_format,
        )  # fmt: skip
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
