"""The handler of the chaos soak (``bench/chaos.py``), loaded by ``chunkd run`` with
PYTHONPATH=bench as ``chaos=chaos_handler:handle``.

Every execution is recorded in the table ``chaos_executions`` of the soak's database: a row
is inserted when the handler starts and stamped when it ends (also when it is cancelled, its
daemon having given up the chunk's lease), so the soak can tell which executions were cut
short by a kill and whether two chunks of a ``max_concurrency = 1`` job ever ran at the same
time. 2 % of the executions fail on purpose (a plain exception: retryable).

The recording survives the chaos: connections are cut and Postgres restarts as handlers run,
so each write is retried for a while. The times are therefore taken when things happen, on
this host's clock, which is the database's clock too (the soak runs its cluster on the same
host; both read ``CLOCK_REALTIME``): a write that lands late does not move them. When the
soak makes the database read-only, the handlers' own sessions stay read-write, so chunks keep
completing while only the daemons' writes fail. The row id is made here, and the insert is
idempotent, so a retried insert whose first try did commit does not record a second
execution.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from chunkd import Chunk, Continue

__all__ = ["EXECUTIONS_DDL", "FAILURE_RATE", "chain", "handle"]

#: Share of executions that raise (a transient, retryable failure).
FAILURE_RATE = 0.02
SLEEP_RANGE_S = (0.005, 0.050)
# How long one write keeps retrying: longer than a Postgres restart takes.
WRITE_RETRY_S = 30.0

EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS chaos_executions (
    id         uuid PRIMARY KEY,
    queue_id   uuid NOT NULL,
    chunk_id   uuid NOT NULL,
    job_id     uuid NOT NULL,
    seq        int NOT NULL,
    attempt    int NOT NULL,
    pid        int NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz,
    failed     boolean,
    cancelled  boolean
);
CREATE INDEX IF NOT EXISTS chaos_executions_queue ON chaos_executions (queue_id);
"""

_RETRYABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,  # a connection cut mid-statement
)

T = TypeVar("T")
_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _get_pool() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            # Not named 'chunkd': the soak cuts only the daemon's own connections.
            _pool = await asyncpg.create_pool(
                os.environ["CHUNKD_DSN"],
                min_size=1,
                max_size=8,
                server_settings={
                    "application_name": "chaos-handler",
                    "default_transaction_read_only": "off",
                },
            )
    return _pool


async def _retrying(write: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    deadline = time.monotonic() + WRITE_RETRY_S
    delay_s = 0.05
    while True:
        try:
            return await write(await _get_pool())
        except _RETRYABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay_s)
            delay_s = min(1.0, delay_s * 2)


def _now() -> datetime:
    return datetime.now(UTC)


async def handle(chunk: Chunk) -> dict[str, object]:
    execution_id = uuid.uuid4()
    started_at = _now()
    await _retrying(
        lambda pool: pool.execute(
            "INSERT INTO chaos_executions"
            " (id, queue_id, chunk_id, job_id, seq, attempt, pid, started_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (id) DO NOTHING",
            execution_id, chunk.queue_id, chunk.chunk_id, chunk.sync_job_id, chunk.seq,
            chunk.attempt, os.getpid(), started_at,
        )
    )  # fmt: skip
    try:
        await asyncio.sleep(random.uniform(*SLEEP_RANGE_S))
    except asyncio.CancelledError:
        # The daemon gave the chunk's lease up (a stall, renewals that failed for a lease):
        # record when the handler stopped, then stop.
        await _stamp(execution_id, _now(), failed=None, cancelled=True)
        raise
    failed = random.random() < FAILURE_RATE
    await _stamp(execution_id, _now(), failed=failed, cancelled=False)
    if failed:
        raise RuntimeError(f"planned transient failure (attempt {chunk.attempt})")
    return {"execution": str(execution_id)}


async def _stamp(
    execution_id: uuid.UUID, ended_at: datetime, *, failed: bool | None, cancelled: bool
) -> None:
    # Shielded: a cancellation arriving while the stamp is written does not lose it.
    await asyncio.shield(
        _retrying(
            lambda pool: pool.execute(
                "UPDATE chaos_executions SET ended_at = $2, failed = $3, cancelled = $4"
                " WHERE id = $1",
                execution_id, ended_at, failed, cancelled,
            )
        )
    )  # fmt: skip


async def chain(chunk: Chunk) -> Continue:
    """A continuation chain: runs like ``handle`` (recorded, may fail on purpose), then appends
    the next page until ``last``."""
    result = await handle(chunk)
    page, last = chunk.payload["page"], chunk.payload["last"]
    following = [{"page": page + 1, "last": last}] if page < last else []
    return Continue(result=result, chunks=following)
