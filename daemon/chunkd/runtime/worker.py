"""Running one claimed chunk: build the Chunk, call its handler under a timeout
(:mod:`chunkd.runtime.invoke`), report.

Whatever the handler does (returns junk, raises, hangs, calls sys.exit, raises a
``CancelledError`` of its own, raises an exception whose ``str()`` fails) becomes an outcome of
that chunk alone; nothing a handler does can take the daemon down. A chunk that ends
without an outcome (the daemon cancelled it: its lease is gone, or a stop) stops renewing the
lease, so the chunk is released at the stop or returned by the reaper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from chunkd.db import ClaimedRow
from chunkd.handlers import Handler
from chunkd.observability.logs import exception_text
from chunkd.observability.metrics import Metrics
from chunkd.observability.tracing import Tracing
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.invoke import Invocation, chunk_of, invoke
from chunkd.runtime.outcomes import Outcome, Outcomes

__all__ = ["Worker"]

log = structlog.get_logger("chunkd.runtime.worker")


class Worker:
    def __init__(
        self,
        handlers: dict[str, Handler],
        outcomes: Outcomes,
        inflight: InFlight,
        metrics: Metrics,
        *,
        chunk_timeout_s: float,
        on_slot_freed: Callable[[str, float], None],
        tracing: Tracing | None = None,
    ) -> None:
        self._handlers = handlers
        self._outcomes = outcomes
        self._inflight = inflight
        self._metrics = metrics
        self._timeout_s = chunk_timeout_s
        self._on_slot_freed = on_slot_freed
        self._handler_seconds: dict[str, Any] = {}
        self._tracing = tracing  # None: tracing is off, and costs this one check per chunk

    async def run(self, row: ClaimedRow) -> None:
        """Runs the handler and queues its outcome; runs in a worker of the pool
        (:mod:`chunkd.runtime.pool`), whose task the daemon cancels for this chunk alone."""
        started = time.perf_counter()
        recorded = False
        try:
            try:
                outcome = await self._call_handler(row)
            finally:
                self._inflight.handler_done(row)
            duration_s = time.perf_counter() - started
            histogram = self._handler_seconds.get(row.kind)
            if histogram is None:  # labels() takes a lock per call: resolve once per kind
                histogram = self._metrics.handler_seconds.labels(row.kind)
                self._handler_seconds[row.kind] = histogram
            histogram.observe(duration_s)
            self._on_slot_freed(row.kind, duration_s)
            self._outcomes.record(row, outcome, round(duration_s * 1000, 3))
            recorded = True
        except asyncio.CancelledError:
            raise  # the daemon's: a lost lease (logged where it was found) or a stop
        except Exception:
            # A bug of ours, not the handler's (its exceptions are outcomes): say so once.
            log.exception("chunk.abandoned", queue_id=str(row.queue_id), attempt=row.attempt)
        finally:
            if not recorded:
                # No outcome will come: stop renewing, so a stop releases the chunk or, failing
                # that, its lease runs out and the reaper returns it. (The supervisor does the
                # same when the task is done, also for a task cancelled before it ran.)
                self._inflight.settled(row)

    async def _call_handler(self, row: ClaimedRow) -> Outcome:
        # The chunk timeout is InFlight's: it cancels this task and marks the claim.
        if self._tracing is None:
            called = await invoke(
                self._handlers[row.kind],
                chunk_of(row),
                timed_out=lambda: self._inflight.timed_out(row),
                timeout_s=self._timeout_s,
            )
            return _with_traceback(called)
        with self._tracing.chunk(
            job_id=row.sync_job_id, kind=row.kind, seq=row.seq, attempt=row.attempt,
            claim_n=row.claim_n, traceparent=row.traceparent, chunk_id=row.id,
        ) as span:  # fmt: skip
            called = await invoke(
                self._handlers[row.kind],
                chunk_of(row),
                timed_out=lambda: self._inflight.timed_out(row),
                timeout_s=self._timeout_s,
            )
            outcome = called.outcome
            span.outcome(outcome.trace_name, error=outcome.error, raised=called.raised)
        return _with_traceback(called)


def _with_traceback(called: Invocation) -> Outcome:
    """The outcome of the call; when the handler raised and debug lines are logged, with the
    exception's traceback as text, which the outcome's log line (``chunk.retry_scheduled``,
    ``chunk.failed``, ...) carries as ``exception``. At info the line keeps the one-line
    ``error``, and nothing is rendered."""
    if called.raised is None or not log.is_enabled_for(logging.DEBUG):
        return called.outcome
    return replace(called.outcome, traceback_text=exception_text(called.raised))
