"""Writing and reporting outcomes: completions in batches, failures one by one, none lost.

A completion is queued only after its handler returned; the worker hands it over and is done,
and the flusher writes whatever accumulated meanwhile in one statement, then logs each
chunk's event and stops renewing its lease. A graceful stop drains the queue before it exits.
Lost connections (a Postgres restart, pg_terminate_backend) are retried with backoff; fencing
makes a late retry harmless.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from chunkd.db import ClaimedRow, DatabaseError, Queue, retry_transient
from chunkd.observability.metrics import Metrics
from chunkd.runtime.inflight import InFlight

__all__ = ["Outcome", "Outcomes"]

log = structlog.get_logger("chunkd.runtime.outcomes")

MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler call came to: a result (``error`` is None) or a failure."""

    result_json: str | None = None
    error: str | None = None
    retryable: bool = True
    retry_in_s: float | None = None
    # A continuation: a JSON array of chunks appended to the job with this completion.
    append_json: str | None = None


@dataclass(frozen=True, slots=True)
class _Completion:
    row: ClaimedRow
    result_json: str | None
    duration_ms: float


@dataclass(frozen=True, slots=True)
class _KindMetrics:
    completed: Any
    failed: Any
    retried: Any


class Outcomes:
    def __init__(
        self,
        queue: Queue,
        inflight: InFlight,
        metrics: Metrics,
        *,
        worker_id: str,
        retry_base_s: float,
        retry_cap_s: float,
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._metrics = metrics
        self._worker_id = worker_id
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._buffer: list[_Completion] = []
        self._has_work = asyncio.Event()
        self._flushing = False
        self._by_kind: dict[str, _KindMetrics] = {}

    async def record(self, row: ClaimedRow, outcome: Outcome, duration_ms: float) -> None:
        """Queues a completion (returns at once) or writes a failure (returns when written)."""
        if outcome.error is None and outcome.append_json is not None:
            # Not batched: its own fenced statement (rare next to plain completions).
            await asyncio.shield(self._complete_and_append(row, outcome, duration_ms))
            return
        if outcome.error is None:
            self._buffer.append(_Completion(row, outcome.result_json, duration_ms))
            self._has_work.set()
            return
        # Shielded: a stop must not cut a failure report in half.
        await asyncio.shield(self._fail(row, outcome, duration_ms))

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def drain(self) -> None:
        """Waits until the flusher has written everything queued (graceful stop)."""
        while self._buffer or self._flushing:
            self._has_work.set()
            await asyncio.sleep(0.005)

    async def run(self) -> None:
        """The flusher task: one statement per batch of whatever accumulated meanwhile."""
        while True:
            await self._has_work.wait()
            self._flushing = True
            try:
                await self._flush()
            finally:
                self._flushing = False

    async def _flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:MAX_BATCH]
            try:
                accepted = await self._complete(batch)
                refused: dict[int, str] = {}
            except DatabaseError:
                # One value the database refuses (e.g. \u0000 in jsonb) must not poison the
                # batch, and the flusher with it: write one by one, and fail what is refused.
                accepted, refused = set(), {}
                for c in batch:
                    try:
                        accepted |= await self._complete([c])
                    except DatabaseError as exc:
                        refused[c.row.id] = f"result rejected by the database: {exc}"
            del self._buffer[: len(batch)]
            for c in batch:
                if c.row.id in accepted:
                    self._inflight.settled(c.row.id)
                    self._for_kind(c.row.kind).completed.inc()
                    log.info("chunk.completed", **self._fields(c.row, c.duration_ms))
                elif c.row.id in refused:
                    error = refused[c.row.id]
                    await self._fail(c.row, Outcome(error=error, retryable=False), c.duration_ms)
                else:
                    self._fenced(c.row, c.duration_ms, "completed")
        self._has_work.clear()

    async def _complete(self, batch: list[_Completion]) -> set[int]:
        return await retry_transient(
            "complete_chunks",
            lambda: self._queue.complete(
                self._worker_id,
                [c.row.id for c in batch],
                [c.row.attempt for c in batch],
                [c.result_json for c in batch],
            ),
        )

    async def _complete_and_append(
        self, row: ClaimedRow, outcome: Outcome, duration_ms: float
    ) -> None:
        assert outcome.append_json is not None
        append_json = outcome.append_json
        try:
            appended = await retry_transient(
                "complete_and_append",
                lambda: self._queue.complete_and_append(
                    self._worker_id, row.id, row.attempt, outcome.result_json, append_json
                ),
            )
        except DatabaseError as exc:  # refused (limits, a value jsonb cannot hold): for good
            error = f"continuation rejected by the database: {exc}"
            await self._fail(row, Outcome(error=error, retryable=False), duration_ms)
            return
        if appended is None:
            self._fenced(row, duration_ms, "completed")
            return
        self._inflight.settled(row.id)
        self._for_kind(row.kind).completed.inc()
        log.info("chunk.completed", appended=appended, **self._fields(row, duration_ms))

    async def _fail(self, row: ClaimedRow, outcome: Outcome, duration_ms: float) -> None:
        error = (outcome.error or "unknown error").replace("\0", "")  # text cannot hold NUL
        try:
            status = await retry_transient(
                "fail_chunk",
                lambda: self._queue.fail(
                    row.id,
                    self._worker_id,
                    row.attempt,
                    error,
                    retryable=outcome.retryable,
                    retry_in_s=outcome.retry_in_s,
                    backoff_base_s=self._retry_base_s,
                    backoff_cap_s=self._retry_cap_s,
                ),
            )
        finally:
            self._inflight.settled(row.id)
        fields = self._fields(row, duration_ms)
        if status is None:
            self._fenced(row, duration_ms, "failed", error=error)
        elif status == "pending":
            self._for_kind(row.kind).retried.inc()
            log.warning("chunk.retry_scheduled", error=error, **fields)
        else:
            self._for_kind(row.kind).failed.inc()
            log.error("chunk.failed", error=error, **fields)

    def _fenced(self, row: ClaimedRow, duration_ms: float, outcome: str, **extra: str) -> None:
        self._inflight.settled(row.id)
        self._metrics.fenced.inc()
        log.warning("chunk.fenced", outcome=outcome, **extra, **self._fields(row, duration_ms))

    def _for_kind(self, kind: str) -> _KindMetrics:
        # labels() looks the child up under a lock on every call: resolve once per kind.
        cached = self._by_kind.get(kind)
        if cached is None:
            m = self._metrics
            cached = self._by_kind[kind] = _KindMetrics(
                m.completed.labels(kind), m.failed.labels(kind), m.retried.labels(kind)
            )
        return cached

    def _fields(self, row: ClaimedRow, duration_ms: float) -> dict[str, object]:
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
