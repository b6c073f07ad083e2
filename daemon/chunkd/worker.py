"""Running one claimed chunk: build the Chunk, call its handler under a timeout, report.

Whatever the handler does (returns junk, raises, hangs, calls sys.exit) becomes an outcome of
that chunk alone; nothing a handler does can take the daemon down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from chunkd.chunk import Chunk, PermanentError, RetryLater
from chunkd.db import ClaimedRow
from chunkd.handlers import Handler
from chunkd.inflight import InFlight
from chunkd.metrics import Metrics
from chunkd.outcomes import Outcomes

__all__ = ["Worker"]

log = structlog.get_logger("chunkd.worker")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler call came to: a result (``error`` is None) or a failure."""

    result_json: str | None = None
    error: str | None = None
    retryable: bool = True
    retry_in_s: float | None = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Worker:
    def __init__(
        self,
        handlers: dict[str, Handler],
        outcomes: Outcomes,
        inflight: InFlight,
        metrics: Metrics,
        *,
        worker_id: str,
        chunk_timeout_s: float,
        on_slot_freed: Callable[[], None],
    ) -> None:
        self._handlers = handlers
        self._outcomes = outcomes
        self._inflight = inflight
        self._metrics = metrics
        self._worker_id = worker_id
        self._timeout_s = chunk_timeout_s
        self._on_slot_freed = on_slot_freed

    async def run(self, row: ClaimedRow) -> None:
        bound = log.bind(
            sync_job_id=str(row.sync_job_id),
            chunk_id=str(row.chunk_id),
            queue_id=str(row.queue_id),
            seq=row.seq,
            attempt=row.attempt,
            kind=row.kind,
            worker_id=self._worker_id,
        )
        started = time.perf_counter()
        outcome = await self._call_handler(row)
        duration_s = time.perf_counter() - started
        self._inflight.handler_done()
        self._metrics.in_flight.dec()
        self._metrics.handler_seconds.labels(row.kind).observe(duration_s)
        self._on_slot_freed()
        try:
            await self._report(row, outcome, bound, round(duration_s * 1000, 3))
        finally:
            self._inflight.settled(row.queue_id)

    async def _call_handler(self, row: ClaimedRow) -> Outcome:
        handler = self._handlers[row.kind]
        chunk = Chunk(
            queue_id=row.queue_id,
            chunk_id=row.chunk_id,
            sync_job_id=row.sync_job_id,
            seq=row.seq,
            attempt=row.attempt,
            kind=row.kind,
            payload=row.payload,
            job_payload=row.job_payload,
        )
        timeout = asyncio.timeout(self._timeout_s)
        try:
            async with timeout:
                result = await handler(chunk)
        except asyncio.CancelledError:
            if timeout.expired():
                return Outcome(error=f"timed out after {self._timeout_s:g}s")
            raise  # shutdown: the supervisor releases the chunk
        except TimeoutError as exc:
            if timeout.expired():
                return Outcome(error=f"timed out after {self._timeout_s:g}s")
            return Outcome(error=_describe(exc))
        except PermanentError as exc:
            return Outcome(error=_describe(exc), retryable=False)
        except RetryLater as exc:
            return Outcome(error=_describe(exc), retry_in_s=exc.delay_s)
        except (Exception, SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # SystemExit too: a handler calling sys.exit() fails its chunk, not the daemon.
            return Outcome(error=_describe(exc))
        try:
            result_json = None if result is None else json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            # Deterministic: the same code returns the same value next time. Fail for good.
            error = f"handler returned a value that is not JSON: {exc}"
            return Outcome(error=error, retryable=False)
        return Outcome(result_json=result_json)

    async def _report(
        self,
        row: ClaimedRow,
        outcome: Outcome,
        bound: structlog.typing.FilteringBoundLogger,
        duration_ms: float,
    ) -> None:
        if outcome.error is None:
            if await self._outcomes.complete(row, outcome.result_json):
                self._metrics.completed.labels(row.kind).inc()
                bound.info("chunk.completed", duration_ms=duration_ms)
            else:
                self._metrics.fenced.inc()
                bound.warning("chunk.fenced", outcome="completed", duration_ms=duration_ms)
            return
        text = outcome.error
        status = await self._outcomes.fail(
            row, text, retryable=outcome.retryable, retry_in_s=outcome.retry_in_s
        )
        if status is None:
            self._metrics.fenced.inc()
            bound.warning("chunk.fenced", outcome="failed", error=text, duration_ms=duration_ms)
        elif status == "pending":
            self._metrics.retried.labels(row.kind).inc()
            bound.warning("chunk.retry_scheduled", error=text, duration_ms=duration_ms)
        else:
            self._metrics.failed.labels(row.kind).inc()
            bound.error("chunk.failed", error=text, duration_ms=duration_ms)
