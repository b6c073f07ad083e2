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
from typing import Any

import structlog

from chunkd.chunk import Chunk, PermanentError, RetryLater
from chunkd.db import ClaimedRow
from chunkd.handlers import Handler
from chunkd.inflight import InFlight
from chunkd.metrics import Metrics
from chunkd.outcomes import Outcomes, ResultRejected

__all__ = ["Worker"]

log = structlog.get_logger("chunkd.worker")

# A queue row is not a blob store: results above this fail the chunk with a clear error.
MAX_RESULT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _KindMetrics:
    completed: Any
    failed: Any
    retried: Any
    handler_seconds: Any


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
        on_slot_freed: Callable[[float], None],
    ) -> None:
        self._handlers = handlers
        self._outcomes = outcomes
        self._inflight = inflight
        self._metrics = metrics
        self._worker_id = worker_id
        self._timeout_s = chunk_timeout_s
        self._on_slot_freed = on_slot_freed
        self._by_kind: dict[str, _KindMetrics] = {}

    async def run(self, row: ClaimedRow) -> None:
        started = time.perf_counter()
        outcome = await self._call_handler(row)
        duration_s = time.perf_counter() - started
        self._inflight.handler_done()
        self._kind_metrics(row.kind).handler_seconds.observe(duration_s)
        self._on_slot_freed(duration_s)
        try:
            await self._report(row, outcome, round(duration_s * 1000, 3))
        finally:
            self._inflight.settled(row.queue_id)

    def _kind_metrics(self, kind: str) -> _KindMetrics:
        # labels() looks the child up under a lock on every call: resolve once per kind.
        cached = self._by_kind.get(kind)
        if cached is None:
            m = self._metrics
            cached = self._by_kind[kind] = _KindMetrics(
                completed=m.completed.labels(kind),
                failed=m.failed.labels(kind),
                retried=m.retried.labels(kind),
                handler_seconds=m.handler_seconds.labels(kind),
            )
        return cached

    def _log_fields(self, row: ClaimedRow, duration_ms: float) -> dict[str, object]:
        # Built only when an event is logged: nothing is bound per chunk on the hot path.
        return {
            "sync_job_id": str(row.sync_job_id),
            "chunk_id": str(row.chunk_id),
            "queue_id": str(row.queue_id),
            "seq": row.seq,
            "attempt": row.attempt,
            "kind": row.kind,
            "worker_id": self._worker_id,
            "duration_ms": duration_ms,
        }

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

    async def _report(self, row: ClaimedRow, outcome: Outcome, duration_ms: float) -> None:
        if outcome.error is None:
            try:
                accepted = await self._outcomes.complete(row, outcome.result_json)
            except ResultRejected as exc:
                error = f"result rejected by the database: {exc}"
                outcome = Outcome(error=error, retryable=False)
            else:
                if accepted:
                    self._kind_metrics(row.kind).completed.inc()
                    log.info("chunk.completed", **self._log_fields(row, duration_ms))
                else:
                    self._metrics.fenced.inc()
                    fields = self._log_fields(row, duration_ms)
                    log.warning("chunk.fenced", outcome="completed", **fields)
                return
        await self._report_failure(row, outcome, duration_ms)

    async def _report_failure(self, row: ClaimedRow, outcome: Outcome, duration_ms: float) -> None:
        error = outcome.error or "unknown error"
        status = await self._outcomes.fail(
            row, error, retryable=outcome.retryable, retry_in_s=outcome.retry_in_s
        )
        fields = self._log_fields(row, duration_ms)
        if status is None:
            self._metrics.fenced.inc()
            log.warning("chunk.fenced", outcome="failed", error=error, **fields)
        elif status == "pending":
            self._kind_metrics(row.kind).retried.inc()
            log.warning("chunk.retry_scheduled", error=error, **fields)
        else:
            self._kind_metrics(row.kind).failed.inc()
            log.error("chunk.failed", error=error, **fields)
