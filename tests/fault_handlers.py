"""Handlers for the reliability tests, run by real ``chunkd run`` subprocesses (PYTHONPATH=tests).

The first ones fail in ways that once lost a chunk (a ``CancelledError`` of the handler's own,
error text PostgreSQL cannot store, a ``__str__`` that raises, a retry delay out of range).
``steps`` works in small steps and records each execution in ``fault_executions`` (start,
end, whether it was cancelled, with the database clock), so a test can tell when a handler
really stopped.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from chunkd import Chunk, RetryLater

__all__ = [
    "EXECUTIONS_DDL",
    "cancels_inner_task",
    "raises_cancelled",
    "retry_later_far",
    "retry_later_nan",
    "steps",
    "str_raises",
    "surrogate_error",
]

EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS public.fault_executions (
    id         bigserial PRIMARY KEY,
    queue_id   uuid NOT NULL,
    seq        int NOT NULL,
    attempt    int NOT NULL,
    pid        int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at   timestamptz,
    cancelled  boolean
)
"""

_pool: asyncpg.Pool | None = None


async def raises_cancelled(chunk: Chunk) -> None:
    raise asyncio.CancelledError()


async def cancels_inner_task(chunk: Chunk) -> None:
    """Cancels a task of its own and lets the CancelledError propagate, as real code does."""
    inner = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    inner.cancel()
    await inner


async def surrogate_error(chunk: Chunk) -> None:
    raise RuntimeError("bad byte \ud800 and NUL \x00 here")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for you")


async def str_raises(chunk: Chunk) -> None:
    raise _Unprintable()


async def retry_later_nan(chunk: Chunk) -> None:
    """A delay the database cannot turn into a time ("interval out of range")."""
    raise RetryLater(float("nan"), "come back at NaN")


async def retry_later_far(chunk: Chunk) -> None:
    """A delay whose due time lies past 9999-12-31, where chunkd stores no time."""
    raise RetryLater(3e11, "come back in 9,500 years")


async def _get_pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        # FAULT_DSN: the test's own way to the database, when the daemon's goes through a
        # proxy that delays replies (the bookkeeping must not be delayed with it).
        _pool = await asyncpg.create_pool(
            os.environ.get("FAULT_DSN") or os.environ["CHUNKD_DSN"],
            min_size=1,
            max_size=2,
            server_settings={"application_name": "fault-handler"},
        )
    return _pool


async def steps(chunk: Chunk) -> dict[str, Any]:
    """``payload["steps"]`` sleeps of ``payload["step_s"]``; the execution is recorded."""
    pool = await _get_pool()
    execution = await pool.fetchval(
        "INSERT INTO public.fault_executions (queue_id, seq, attempt, pid) VALUES ($1, $2, $3, $4)"
        " RETURNING id",
        chunk.queue_id, chunk.seq, chunk.attempt, os.getpid(),
    )  # fmt: skip
    cancelled = True
    try:
        for _ in range(int(chunk.payload["steps"])):
            await asyncio.sleep(float(chunk.payload["step_s"]))
        cancelled = False
    finally:
        # Also when cancelled: the stamp says when the handler really stopped.
        await asyncio.shield(
            pool.execute(
                "UPDATE public.fault_executions SET ended_at = clock_timestamp(), cancelled = $2"
                " WHERE id = $1",
                execution,
                cancelled,
            )
        )
    return {"pid": os.getpid()}
