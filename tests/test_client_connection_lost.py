"""A connection cut during a client call is :class:`chunkd.ConnectionLostError`, whichever
driver saw it and however, and the documented recipe (retry on a new connection with the same
``dedupe_key``) creates each job exactly once.

The cuts are real: ``pg_terminate_backend`` of the client's own backend, once while its
enqueue waits for a row lock another session holds, and many times at random moments while
producers enqueue as fast as they can (the storm in which asyncpg let ``InternalClientError``
and ``ConnectionDoesNotExistError`` through before).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import psycopg
import pytest

import chunkd
from chunkd.client import sync
from daemon_helpers import wait_until

DRIVERS = ["asyncpg", "asyncpg-pool", "psycopg-async", "psycopg-sync"]
KEY = "mailbox-42"
# A backend waiting for a lock on our test database: the enqueue under test.
WAITING_BACKEND = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def _jobs_with_key(conn: asyncpg.Connection, key: str) -> list[UUID]:
    rows = await conn.fetch(
        "SELECT id FROM chunkd.sync_jobs WHERE kind = 'sync' AND dedupe_key = $1", key
    )
    return [r["id"] for r in rows]


class Target:
    """One driver's way to enqueue, and to get a new connection after a lost one."""

    def __init__(self, driver: str, dsn: str, pool: asyncpg.Pool) -> None:
        self.driver, self.dsn, self.pool = driver, dsn, pool
        self.opened: list[Any] = []

    async def connection(self) -> Any:
        if self.driver == "asyncpg-pool":
            return self.pool
        if self.driver == "asyncpg":
            conn: Any = await asyncpg.connect(self.dsn)
        elif self.driver == "psycopg-async":
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        else:
            conn = psycopg.connect(self.dsn, autocommit=True)
        self.opened.append(conn)
        return conn

    async def enqueue(self, conn: Any, key: str) -> UUID:
        if self.driver == "psycopg-sync":
            return await asyncio.to_thread(
                sync.create_sync_job, conn, "sync", [1, 2], dedupe_key=key
            )
        return await chunkd.create_sync_job(conn, "sync", [1, 2], dedupe_key=key)

    async def close(self) -> None:
        for conn in self.opened:
            closing = conn.close()
            if isinstance(closing, Awaitable):
                await closing


@pytest.fixture(params=DRIVERS)
async def target(request, database, pool) -> Any:
    made = Target(request.param, database.dsn, pool)
    try:
        yield made
    finally:
        await made.close()


async def test_an_enqueue_cut_while_it_waits_is_connection_lost_and_retries_once(
    target: Target, conn: asyncpg.Connection, database
) -> None:
    # Another producer's enqueue with the same key, not yet committed: ours waits for its row.
    holder = await asyncpg.connect(database.dsn)
    try:
        holding = holder.transaction()
        await holding.start()
        held = await chunkd.create_sync_job(holder, "sync", [1, 2], dedupe_key=KEY)

        first = await target.connection()
        call = asyncio.ensure_future(target.enqueue(first, KEY))
        pid = await wait_until(
            lambda: conn.fetchval(WAITING_BACKEND), timeout_s=10, what="the enqueue to wait"
        )
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(chunkd.ConnectionLostError) as raised:
            await call
        # Recognisable without chunkd's names too: a ConnectionError, the driver's as cause.
        assert isinstance(raised.value, ConnectionError)
        assert raised.value.__cause__ is not None
        driver = type(raised.value.__cause__).__module__.partition(".")[0]
        assert driver == target.driver.partition("-")[0]
        assert str(raised.value).startswith(
            "the connection to the database was lost during create_sync_job ("
        )
        # The other producer's job commits: the lost call may as well have been the one that
        # took effect. The retry, on a new connection, with the same key, finds it.
        await holding.commit()
    finally:
        await holder.close()
    again = await target.connection()
    assert await target.enqueue(again, KEY) == held
    assert await _jobs_with_key(conn, KEY) == [held], "exactly one job for the key"


async def test_inside_an_asyncpg_transaction_the_lost_call_is_the_context(conn, database) -> None:
    """asyncpg's transaction block replaces the exception on its way out (documented)."""
    holder = await asyncpg.connect(database.dsn)
    target = await asyncpg.connect(database.dsn)
    try:
        holding = holder.transaction()
        await holding.start()
        await chunkd.create_sync_job(holder, "sync", [1], dedupe_key=KEY)

        async def in_a_transaction() -> None:
            async with target.transaction():
                await chunkd.create_sync_job(target, "sync", [1], dedupe_key=KEY)

        call = asyncio.ensure_future(in_a_transaction())
        pid = await wait_until(
            lambda: conn.fetchval(WAITING_BACKEND), timeout_s=10, what="the enqueue to wait"
        )
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(
            asyncpg.InterfaceError, match="underlying connection is closed"
        ) as raised:
            await call
        assert isinstance(raised.value.__context__, chunkd.ConnectionLostError)
        assert target.is_closed()
        await holding.rollback()
    finally:
        await holder.close()
        await target.close()


async def _storm(
    enqueue: Callable[[int, str], Awaitable[UUID]],
    reconnect: Callable[[int], Awaitable[None]],
    conn: asyncpg.Connection,
    producers: int,
    seconds: float,
) -> tuple[collections.Counter[str], dict[str, UUID]]:
    """Producers enqueue one job per key, retrying a key after ConnectionLostError (the
    recipe), while a killer terminates a random client backend every few milliseconds."""
    outcomes: collections.Counter[str] = collections.Counter()
    created: dict[str, UUID] = {}
    stop_at = time.monotonic() + seconds

    async def produce(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            key = f"p{i}-{n}"
            while True:
                try:
                    created[key] = await enqueue(i, key)
                    outcomes["created"] += 1
                    break
                except chunkd.ConnectionLostError:
                    outcomes["lost"] += 1
                    await reconnect(i)
                except Exception as exc:  # any other type is the failure under test
                    outcomes[f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"] += 1
                    await reconnect(i)

    async def kill() -> None:
        while time.monotonic() < stop_at:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend' ORDER BY random() LIMIT 1"
            )
            await asyncio.sleep(random.uniform(0.001, 0.03))

    await asyncio.gather(kill(), *(produce(i) for i in range(producers)))
    return outcomes, created


async def _exactly_one_job_per_key(conn: asyncpg.Connection, created: dict[str, UUID]) -> None:
    rows = await conn.fetch("SELECT dedupe_key, id FROM chunkd.sync_jobs WHERE kind = 'sync'")
    assert len(rows) == len(created), "a retried enqueue created a second job"
    assert {r["dedupe_key"]: r["id"] for r in rows} == created


async def test_backend_kills_during_a_pool_enqueue_storm_are_all_connection_lost(
    database, conn: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(database.dsn, min_size=4, max_size=4)
    try:

        async def enqueue(_i: int, key: str) -> UUID:
            return await chunkd.create_sync_job(pool, "sync", [1] * 20, dedupe_key=key)

        async def reconnect(_i: int) -> None:
            return None  # the pool replaces a broken connection by itself

        outcomes, created = await _storm(enqueue, reconnect, conn, producers=8, seconds=3)
    finally:
        await pool.close()
    others = {k: v for k, v in outcomes.items() if k not in ("created", "lost")}
    assert others == {}, others
    assert outcomes["lost"] >= 10 and outcomes["created"] >= 100, outcomes
    await _exactly_one_job_per_key(conn, created)


async def test_backend_kills_during_a_psycopg_enqueue_storm_are_all_connection_lost(
    database, conn: asyncpg.Connection
) -> None:
    connections: list[psycopg.AsyncConnection[Any]] = [
        await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) for _ in range(4)
    ]
    try:

        async def enqueue(i: int, key: str) -> UUID:
            return await chunkd.create_sync_job(connections[i], "sync", [1] * 20, dedupe_key=key)

        async def reconnect(i: int) -> None:
            await connections[i].close()
            connections[i] = await psycopg.AsyncConnection.connect(database.dsn, autocommit=True)

        outcomes, created = await _storm(enqueue, reconnect, conn, producers=4, seconds=3)
    finally:
        for connection in connections:
            await connection.close()
    others = {k: v for k, v in outcomes.items() if k not in ("created", "lost")}
    assert others == {}, others
    assert outcomes["lost"] >= 10 and outcomes["created"] >= 100, outcomes
    await _exactly_one_job_per_key(conn, created)


async def test_a_connection_closed_before_the_call_is_the_drivers_own_error(database) -> None:
    """Nothing was sent, so nothing is unknown: not a ConnectionLostError."""
    closed = await asyncpg.connect(database.dsn)
    await closed.close()
    with pytest.raises(asyncpg.InterfaceError):
        await chunkd.create_sync_job(closed, "sync", [1], dedupe_key=KEY)
    blocking = psycopg.connect(database.dsn, autocommit=True)
    blocking.close()
    with pytest.raises(psycopg.OperationalError) as raised:
        sync.create_sync_job(blocking, "sync", [1], dedupe_key=KEY)
    assert not isinstance(raised.value, chunkd.ConnectionLostError)
