"""Running one claimed chunk: build the Chunk, call its handler under a timeout, report.

Whatever the handler does (returns junk, raises, hangs, calls sys.exit) becomes an outcome of
that chunk alone; nothing a handler does can take the daemon down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from chunkd.chunk import Chunk, Continue, PermanentError, RetryLater, dumps_json
from chunkd.db import ClaimedRow
from chunkd.handlers import Handler
from chunkd.observability.metrics import Metrics
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.outcomes import Outcome, Outcomes

__all__ = ["Worker"]

# A queue row is not a blob store: results above this fail the chunk with a clear error.
MAX_RESULT_BYTES = 1024 * 1024


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
        started = time.perf_counter()
        try:
            outcome = await self._call_handler(row)
        finally:
            self._inflight.handler_done()
        duration_s = time.perf_counter() - started
        histogram = self._handler_seconds.get(row.kind)
        if histogram is None:  # labels() takes a lock per call: resolve once per kind
            histogram = self._metrics.handler_seconds.labels(row.kind)
            self._handler_seconds[row.kind] = histogram
        histogram.observe(duration_s)
        self._on_slot_freed(duration_s)
        await self._outcomes.record(row, outcome, round(duration_s * 1000, 3))

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
