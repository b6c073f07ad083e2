"""Running chunks in-process through the daemon's own statements and handler code: a claim
(``claim_or_wait``), the handler called as the worker calls it (:mod:`chunkd.runtime.invoke`),
the outcome written with the daemon's fenced statements. Shared by :func:`~chunkd.testing.drain`
and the failure simulators."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from chunkd.chunk import Chunk, loads_json
from chunkd.db import DATABASE_ERRORS, ClaimedRow, Queue, create_pool, is_data_error
from chunkd.db.sql_files import queries
from chunkd.handlers import Handler
from chunkd.runtime.health import first_line
from chunkd.runtime.invoke import Invocation, chunk_of, invoke
from chunkd.runtime.outcomes import Outcome, storable_text
from chunkd.settings import RunSettings

__all__ = ["OUTCOMES", "Run", "Runner", "runner"]

# What drain() counts, and what a simulated delivery can come to besides.
OUTCOMES = ("completed", "snoozed", "retried", "failed", "fenced")
# The daemon's defaults (--retry-base, --retry-cap): a retry is scheduled as it would be.
RETRY_BASE_S = 2.0
RETRY_CAP_S = 600.0


@dataclass(frozen=True)
class Run:
    """One delivery of a chunk to its handler and what came of it.

    ``outcome``: ``completed``, ``retried`` (a retry is scheduled), ``failed`` (for good) or
    ``fenced`` (the database refused the outcome: the chunk was no longer this delivery's), as
    written; or, for a delivery that went wrong on purpose, ``lost`` (the handler finished but
    its outcome never reached the database), ``cancelled`` (the lease was lost and the handler
    cancelled) or ``killed`` (its process was killed mid-handler). ``result``: what the handler
    returned, as stored (JSON values, numbers exact); ``error``: its failure as stored;
    ``raised``: the exception itself, when it ran in this process.
    """

    chunk: Chunk[Any, Any]
    outcome: str
    result: Any = None
    error: str | None = None
    raised: BaseException | None = None

    @property
    def attempt(self) -> int:
        return self.chunk.attempt


class Runner:
    """A pool on the test database, acting as one worker (its own worker id)."""

    def __init__(self, queue: Queue, pool: Any, kinds: Sequence[str], timeout_s: float) -> None:
        self.queue = queue
        self.pool = pool
        self.kinds = list(kinds)
        self.timeout_s = timeout_s
        self.worker_id = f"chunkd-testing-{uuid.uuid4().hex[:12]}"
        # Longer than any handler may run: the lease never runs out by itself meanwhile.
        self.lease_s = timeout_s + 60.0

    async def claim(self, *, lease_s: float | None = None) -> tuple[ClaimedRow | None, float]:
        """The next runnable chunk of the kinds, or None and the seconds a rate limit asks to
        wait (0: nothing is due)."""
        claim = await self.queue.claim(self.worker_id, 1, self.kinds, lease_s or self.lease_s)
        if claim.rows:
            return claim.rows[0], 0.0
        return None, claim.wait_s or 0.0

    async def fast_forward(self) -> int:
        """Makes the chunks waiting for a backoff or a ``run_at`` due now; how many."""
        due: int = await self.pool.fetchval(queries()["testing_fast_forward"], self.kinds)
        return due

    async def release(self, rows: Sequence[ClaimedRow]) -> None:
        if rows:
            ids = [row.queue_id for row in rows]
            await self.pool.fetchval(queries()["testing_release"], self.worker_id, ids)

    async def call(self, handler: Handler, chunk: Chunk[Any, Any]) -> Invocation:
        """Calls the handler in a task of its own under the chunk timeout, as the worker does."""
        return await self.start(handler, chunk)

    def start(self, handler: Handler, chunk: Chunk[Any, Any]) -> asyncio.Task[Invocation]:
        """The handler running in a task of its own, cancelled at the chunk timeout (its
        outcome then says so) like the daemon's."""
        fired = False

        async def body() -> Invocation:
            return await invoke(handler, chunk, timed_out=lambda: fired, timeout_s=self.timeout_s)

        task = asyncio.get_running_loop().create_task(body(), name=f"chunk-{chunk.queue_id}")

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout_s, fire)
        task.add_done_callback(lambda _: timer.cancel())
        return task

    async def record(self, row: ClaimedRow, outcome: Outcome) -> tuple[str, str | None]:
        """Writes the outcome as the daemon's outcome writer does; returns what it came to
        (one of :data:`OUTCOMES`) and the error as stored."""
        if outcome.error is None:
            try:
                if outcome.append_json is not None:
                    appended = await self.queue.complete_and_append(
                        self.worker_id, row.id, row.attempt, outcome.result_json,
                        outcome.append_json,
                    )  # fmt: skip
                    return ("completed" if appended is not None else "fenced"), None
                accepted = await self.queue.complete(
                    self.worker_id, [row.id], [row.attempt], [outcome.result_json]
                )
                return ("completed" if row.id in accepted else "fenced"), None
            except DATABASE_ERRORS as exc:
                if not is_data_error(exc):
                    raise
                what = "continuation" if outcome.append_json is not None else "result"
                error = f"{what} rejected by the database: {first_line(exc)}"
                outcome = Outcome(error=error, retryable=False)
        error = storable_text(outcome.error or "unknown error")
        if outcome.snooze and outcome.retry_in_s is not None:
            status = await self.queue.snooze(
                row, self.worker_id, error, delay_s=outcome.retry_in_s,
                max_snoozes=RunSettings.max_snoozes, lease_s=self.lease_s,
            )  # fmt: skip
        else:
            status = await self.queue.fail(
                row.id, self.worker_id, row.attempt, error, retryable=outcome.retryable,
                retry_in_s=outcome.retry_in_s, backoff_base_s=RETRY_BASE_S,
                backoff_cap_s=RETRY_CAP_S,
            )  # fmt: skip
        outcomes = {"snoozed": "snoozed", "pending": "retried", "failed": "failed"}
        return outcomes.get(status or "", "fenced"), error

    async def deliver(self, handler: Handler, row: ClaimedRow) -> Run:
        """Runs one claimed chunk to its written outcome."""
        chunk = chunk_of(row)
        called = await self.call(handler, chunk)
        outcome, error = await self.record(row, called.outcome)
        result = None
        if outcome == "completed" and called.outcome.result_json is not None:
            result = loads_json(called.outcome.result_json)
        return Run(chunk, outcome, result, error, called.raised)


@asynccontextmanager
async def runner(dsn: str, kinds: Sequence[str], timeout_s: float) -> AsyncIterator[Runner]:
    """A :class:`Runner` on ``dsn`` for ``kinds``; its pool closed at the end."""
    if not kinds:
        raise ValueError("no kinds to run: the app has no handlers")
    pool = await create_pool(dsn, size=2)
    try:
        yield Runner(Queue(pool), pool, kinds, timeout_s)
    finally:
        await pool.close()
