"""Running one claimed chunk: build the Chunk, call its handler under a timeout, report.

Whatever the handler does (returns junk, raises, hangs, calls sys.exit, raises a
``CancelledError`` of its own, raises an exception whose ``str()`` fails) becomes an outcome of
that chunk alone; nothing a handler does can take the daemon down. A chunk task that ends
without an outcome (the daemon cancelled it: its lease is gone, or a stop) stops renewing the
lease, so the chunk is released at the stop or returned by the reaper.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from chunkd.chunk import (
    MAX_RESULT_BYTES,
    Chunk,
    Continue,
    PermanentError,
    RetryLater,
    UndecodablePayloadError,
    dumps_json,
)
from chunkd.db import ClaimedRow
from chunkd.handlers import Handler
from chunkd.observability.metrics import Metrics
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.outcomes import Outcome, Outcomes, describe_exception

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
        on_slot_freed: Callable[[float], None],
    ) -> None:
        self._handlers = handlers
        self._outcomes = outcomes
        self._inflight = inflight
        self._metrics = metrics
        self._timeout_s = chunk_timeout_s
        self._on_slot_freed = on_slot_freed
        self._handler_seconds: dict[str, Any] = {}

    async def run(self, row: ClaimedRow) -> None:
        """Runs the handler and queues its outcome; runs in a task of its own per chunk."""
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
            self._on_slot_freed(duration_s)
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
        handler = self._handlers[row.kind]
        chunk = Chunk.from_json(
            queue_id=row.queue_id,
            chunk_id=row.chunk_id,
            sync_job_id=row.sync_job_id,
            seq=row.seq,
            attempt=row.attempt,
            kind=row.kind,
            payload_json=row.payload_json,
            job_payload_json=row.job_payload_json,
        )
        try:
            # The chunk timeout is InFlight's: it cancels this task and marks the claim.
            result = await handler(chunk)
        except (
            Exception,
            asyncio.CancelledError,
            SystemExit,
            KeyboardInterrupt,
            GeneratorExit,
        ) as exc:
            # SystemExit too: a handler calling sys.exit() fails its chunk, not the daemon.
            return self._failure(row, exc)
        if self._inflight.timed_out(row):
            # It swallowed the timeout's cancellation and returned: its result stands.
            self._uncancel_timeout()
        if isinstance(result, Continue):
            from chunkd.runtime.continuation import continuation_outcome

            return continuation_outcome(result)
        try:
            # dumps_json: a Decimal (as handlers get for non-integers) is written exactly.
            result_json = None if result is None else dumps_json(result)
        except (TypeError, ValueError, RecursionError) as exc:
            # Deterministic: the same code returns the same value next time. Fail for good.
            error = f"handler returned a value that is not JSON: {exc}"
            return Outcome(error=error, retryable=False)
        if result_json is not None and len(result_json) > MAX_RESULT_BYTES:
            error = f"handler result is {len(result_json)} bytes, above the {MAX_RESULT_BYTES}"
            return Outcome(
                error=f"{error}-byte limit (store big results elsewhere)", retryable=False
            )
        return Outcome(result_json=result_json)

    def _failure(self, row: ClaimedRow, exc: BaseException) -> Outcome:
        """The outcome of a handler that raised ``exc`` (or was cancelled)."""
        if self._inflight.timed_out(row):
            # The chunk timeout cancelled it, whatever the handler made of the cancellation.
            if self._uncancel_timeout():
                return Outcome(error=f"timed out after {self._timeout_s:g}s")
            raise exc if isinstance(exc, asyncio.CancelledError) else asyncio.CancelledError()
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise exc  # the daemon's cancellation: the lease is gone, or a stop
            # The handler's own (it cancelled an inner task and let that propagate): a failure
            # of this chunk like any other exception, not a reason to drop the chunk.
            return Outcome(error=describe_exception(exc))
        if isinstance(exc, PermanentError):
            return Outcome(error=describe_exception(exc), retryable=False)
        undecodable = _undecodable_cause(exc)
        if undecodable is not None:
            # Raised from (or while handling) a payload that can never be decoded: every
            # attempt would end the same way, whatever the handler made of it.
            error = f"{describe_exception(exc)} (from {describe_exception(undecodable)})"
            return Outcome(error=error, retryable=False)
        if isinstance(exc, RetryLater):
            return Outcome(error=describe_exception(exc), retry_in_s=exc.delay_s)
        return Outcome(error=describe_exception(exc))

    @staticmethod
    def _uncancel_timeout() -> bool:
        """Takes back the timeout's cancellation of this task; False when another one (the
        daemon's: a lost lease, a stop) is still pending."""
        task = asyncio.current_task()
        return task is None or task.uncancel() == 0


def _undecodable_cause(exc: BaseException) -> UndecodablePayloadError | None:
    """The :class:`UndecodablePayloadError` that ``exc`` was raised from or while handling, if
    any (its ``__cause__`` and ``__context__`` chain, each exception once)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UndecodablePayloadError):
            return current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None
