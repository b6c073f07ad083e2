"""A fleet at work beside a session that holds locks: a real daemon claiming a stream of
chunks, application sessions left idle in a transaction, and what the fleet saw meanwhile
(the gaps between its claims, how long an unrelated enqueue took)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from chunkd.db import connect
from daemon_helpers import Daemon, wait_until

STREAM = "stream=daemon_handlers:nap"


@dataclass
class Fleet:
    """A daemon working through a long job of kind ``stream``, and a connection that watches."""

    dsn: str
    watch: asyncpg.Connection
    job: UUID
    daemon: Daemon

    async def now(self) -> datetime:
        return await self.watch.fetchval("SELECT clock_timestamp()")

    async def longest_gap_s(self, since: datetime, until: datetime) -> float:
        """The longest time without a claim of the stream's chunks between ``since`` and
        ``until`` (database clock; the edges count as the gaps' ends)."""
        rows = await self.watch.fetch(
            "SELECT a.claimed_at FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id"
            " WHERE j.public_id = $1 AND a.claimed_at BETWEEN $2 AND $3 ORDER BY a.claimed_at",
            self.job,
            since,
            until,
        )
        moments = [since, *(r["claimed_at"] for r in rows), until]
        return max((b - a).total_seconds() for a, b in itertools.pairwise(moments))

    async def timed_enqueue(self, timeout_s: float = 15.0) -> float:
        """Seconds an unrelated producer (a session of its own) takes to enqueue a job; an
        enqueue still waiting after ``timeout_s`` is given up (its session ended)."""
        producer = await connect(self.dsn, application_name="unrelated-producer")
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                producer.fetchval(
                    "SELECT chunkd.create_sync_job('unrelated', '[{\"n\": 1}]'::jsonb)"
                ),
                timeout_s,
            )
        except TimeoutError:
            producer.terminate()
        else:
            await producer.close()
        return time.monotonic() - started


async def start_fleet(dsn: str, watch: asyncpg.Connection, start: Callable[..., Daemon]) -> Fleet:
    """A stream of 20,000 chunks of 10 ms, worked by one daemon of concurrency 4; returns once
    it has claimed 50 of them."""
    job = await watch.fetchval(
        "SELECT chunkd.create_sync_job('stream', $1::jsonb)",
        json.dumps([{"sleep_s": 0.01}] * 20_000),
    )
    daemon = start("--handler", STREAM, "--concurrency", "4", log_level="info")

    async def flowing() -> bool:
        return bool(await watch.fetchval("SELECT count(*) >= 50 FROM chunkd.attempts"))

    await wait_until(flowing, timeout_s=30, what="the daemon to claim the stream")
    return Fleet(dsn, watch, job, daemon)


@dataclass
class Holder:
    """An application session left idle in a transaction, and what it holds."""

    conn: asyncpg.Connection
    tx: Any
    pid: int

    async def commit(self) -> None:
        await self.tx.commit()

    async def close(self) -> None:
        if not self.conn.is_closed():
            await self.conn.close()


async def hold(dsn: str, statement: str, *args: Any, isolation: str = "read_committed") -> Holder:
    """A session named ``billing-app`` that runs ``statement`` in a transaction it leaves
    open (idle in transaction) until :meth:`Holder.commit`."""
    conn = await connect(dsn, application_name="billing-app")
    tx = conn.transaction(isolation=isolation)
    await tx.start()
    await conn.execute(statement, *args)
    return Holder(conn, tx, await conn.fetchval("SELECT pg_backend_pid()"))


IDLE_ENQUEUE = "SELECT chunkd.create_sync_job('billing', '[{\"invoice\": 1}]'::jsonb)"


async def cli_backend(watch: asyncpg.Connection, timeout_s: float = 30) -> int:
    """The pid of the ``chunkd`` CLI's session once it runs a statement."""

    async def running() -> int | None:
        pid: int | None = await watch.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'chunkd-cli'"
            " AND state = 'active'"
        )
        return pid

    found: int = await wait_until(running, timeout_s=timeout_s, what="the CLI's statement")
    return found
