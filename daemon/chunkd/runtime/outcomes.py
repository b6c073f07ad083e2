"""Writing and reporting outcomes: completions in batches, failures (and snoozes: a handler's
``RetryLater``) a few at a time, none lost.

A worker hands its chunk's outcome over (:meth:`Outcomes.record`) and is done; the outcome
stays queued, and the chunk's lease renewed, until a statement has written it (or fencing
said the chunk is no longer ours). A write that fails is tried again with backoff, on a fresh
connection when the connection broke, whatever the database said, with one exception: a data
error (SQLSTATE class 22: a value the database can never store) fails that chunk for good
with the database's words, since the same value would be refused again. Fencing makes a late
or repeated write harmless. A graceful stop drains the queue before it exits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

import structlog

from chunkd.db import DATABASE_ERRORS, ClaimedRow, Queue, is_data_error
from chunkd.observability.metrics import Metrics
from chunkd.runtime.health import DatabaseHealth, first_line
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.progress import Progress

__all__ = ["Outcome", "Outcomes", "describe_exception", "storable_text"]

log = structlog.get_logger("chunkd.runtime.outcomes")

MAX_BATCH = 500
# Failure reports are one statement each: a few at once, so a burst of failures does not queue
# behind one round trip each, while the pool keeps connections for claims and renewals.
MAX_PARALLEL_FAILURES = 4
# The database keeps the first 4000 characters of an error: building more is waste.
MAX_ERROR_CHARS = 4000
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL text can hold it: lone surrogates and NUL as backslash escapes."""
    text = text[:MAX_ERROR_CHARS]
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\x00")


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception, storable even when its ``str()`` raises."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except (Exception, SystemExit, KeyboardInterrupt, GeneratorExit) as failure:
        text = f"<str() of this exception raised {type(failure).__name__}>"
    return storable_text(f"{name}: {text}" if text else name)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler call came to: a result (``error`` is None) or a failure."""

    result_json: str | None = None
    error: str | None = None
    retryable: bool = True
    retry_in_s: float | None = None
    # A handler's RetryLater: run again in retry_in_s seconds without spending the attempt
    # (up to --max-snoozes times per chunk).
    snooze: bool = False
    # A continuation: a JSON array of chunks appended to the job with this completion.
    append_json: str | None = None
    # The handler's exception as traceback text, set only at --log-level debug (the worker's
    # choice): the outcome's log line carries it as `exception`.
    traceback_text: str | None = None

    @property
    def trace_name(self) -> str:
        """The span attribute ``chunkd.outcome``: completed, error (retried while attempts
        remain), failed (for good) or snoozed."""
        if self.error is None:
            return "completed"
        if self.snooze:
            return "snoozed"
        return "error" if self.retryable else "failed"


@dataclass(frozen=True, slots=True, eq=False)
class _Queued:
    row: ClaimedRow
    outcome: Outcome
    duration_ms: float
    plain: bool = False  # already re-sent as plain ASCII with the default backoff


@dataclass(frozen=True, slots=True)
class _KindMetrics:
    completed: Any
    failed: Any
    retried: Any
    snoozed: Any


class Outcomes:
    def __init__(
        self,
        queue: Queue,
        inflight: InFlight,
        metrics: Metrics,
        health: DatabaseHealth,
        progress: Progress,
        *,
        worker_id: str,
        retry_base_s: float,
        retry_cap_s: float,
        max_snoozes: int,
        lease_s: float,
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._metrics = metrics
        self._health = health
        self._progress = progress
        self._worker_id = worker_id
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._max_snoozes = max_snoozes
        self._lease_s = lease_s  # what the claimer claims with: a snooze fences on the claim
        self._completions: list[_Queued] = []
        self._failures: list[_Queued] = []
        self._completions_queued = asyncio.Event()
        self._failures_queued = asyncio.Event()
        self._all_written = asyncio.Event()
        self._all_written.set()
        self._by_kind: dict[str, _KindMetrics] = {}

    def record(self, row: ClaimedRow, outcome: Outcome, duration_ms: float) -> None:
        """Queues the outcome of a chunk whose handler returned; returns at once."""
        self._inflight.reporting(row)
        self._all_written.clear()
        if outcome.error is None:
            self._completions.append(_Queued(row, outcome, duration_ms))
            self._completions_queued.set()
        else:
            self._failures.append(_Queued(row, outcome, duration_ms))
            self._failures_queued.set()

    @property
    def pending(self) -> int:
        """Outcomes queued and not yet written."""
        return len(self._completions) + len(self._failures)

    async def drain(self) -> None:
        """Waits until everything queued is written (graceful stop; the caller bounds it)."""
        await self._all_written.wait()

    async def run(self) -> None:
        """The writers: one for completions, one for failures, each retrying until written."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._write_all(self._completions_queued, self._completions))
            group.create_task(self._write_all(self._failures_queued, self._failures))

    async def _write_all(self, queued: asyncio.Event, items: list[_Queued]) -> None:
        write = self._complete_some if items is self._completions else self._fail_some
        backoff_s = RETRY_FIRST_S
        while True:
            await queued.wait()
            queued.clear()
            while items:
                if await write():
                    backoff_s = RETRY_FIRST_S
                else:  # the database cannot take it now: keep it, try again later
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(RETRY_MAX_S, backoff_s * 2)
            if not self.pending:
                self._all_written.set()

    # --- completions ---------------------------------------------------------------------

    async def _complete_some(self) -> bool:
        """Writes the oldest batch; False when the database could not take it."""
        if self._completions[0].outcome.append_json is not None:
            return await self._complete_and_append(self._completions[0])
        batch: list[_Queued] = []
        ids: set[int] = set()
        for item in self._completions[:MAX_BATCH]:
            if item.row.id in ids or item.outcome.append_json is not None:
                break  # a later claim of the same chunk, or a continuation: a write of its own
            ids.add(item.row.id)
            batch.append(item)
        try:
            accepted = await self._complete(batch)
        except Exception as exc:
            if isinstance(exc, DATABASE_ERRORS) and not is_data_error(exc):
                await self._health.failed("complete", exc)
                return False
            # One value the database refuses (e.g. \u0000 in jsonb) must not hold back the
            # batch: write one by one, and fail what is refused.
            return await self._complete_one_by_one(batch)
        del self._completions[: len(batch)]
        self._completed(batch, accepted)
        return True

    async def _complete_one_by_one(self, batch: list[_Queued]) -> bool:
        for item in batch:
            try:
                accepted = await self._complete([item])
            except Exception as exc:
                if isinstance(exc, DATABASE_ERRORS) and not is_data_error(exc):
                    await self._health.failed("complete", exc)
                    return False
                self._completions.remove(item)
                error = storable_text(f"result rejected by the database: {first_line(exc)}")
                self._failures.append(replace(item, outcome=Outcome(error=error, retryable=False)))
                self._failures_queued.set()
                continue
            self._completions.remove(item)
            self._completed([item], accepted)
        return True

    async def _complete(self, batch: list[_Queued]) -> set[int]:
        accepted = await self._queue.complete(
            self._worker_id,
            [c.row.id for c in batch],
            [c.row.attempt for c in batch],
            [c.outcome.result_json for c in batch],
        )
        self._health.wrote()
        return accepted

    async def _complete_and_append(self, item: _Queued) -> bool:
        """A continuation: its completion and the chunks it appends, in one fenced statement
        of its own (rare next to plain completions)."""
        row, outcome = item.row, item.outcome
        assert outcome.append_json is not None
        try:
            appended = await self._queue.complete_and_append(
                self._worker_id, row.id, row.attempt, outcome.result_json, outcome.append_json
            )
        except Exception as exc:
            if isinstance(exc, DATABASE_ERRORS) and not is_data_error(exc):
                await self._health.failed("complete", exc)
                return False
            # Refused for good (a value jsonb cannot hold, the per-job limit): fail the chunk.
            self._completions.remove(item)
            error = storable_text(f"continuation rejected by the database: {first_line(exc)}")
            self._failures.append(replace(item, outcome=Outcome(error=error, retryable=False)))
            self._failures_queued.set()
            return True
        self._health.wrote()
        self._completions.remove(item)
        if appended is None:
            self._fenced(row, item.duration_ms, "completed")
        else:
            self._inflight.settled(row)
            self._for_kind(row.kind).completed.inc()
            self._progress.tally(row).completed += 1
            # Rare (a continuation grows the job): worth a line at info, unlike plain successes.
            log.info("chunk.completed", appended=appended, **self._fields(row, item.duration_ms))
        return True

    def _completed(self, batch: list[_Queued], accepted: set[int]) -> None:
        # Success lines are opt-in (debug), built only then: see chunkd.runtime.progress.
        log_each = log.is_enabled_for(logging.DEBUG)
        for c in batch:
            if c.row.id in accepted:
                self._inflight.settled(c.row)
                self._for_kind(c.row.kind).completed.inc()
                self._progress.tally(c.row).completed += 1
                if log_each:
                    log.debug("chunk.completed", **self._fields(c.row, c.duration_ms))
            else:
                self._fenced(c.row, c.duration_ms, "completed")

    # --- failures ------------------------------------------------------------------------

    async def _fail_some(self) -> bool:
        """Writes the oldest few failures at once; False when none could be written."""
        batch = self._failures[:MAX_PARALLEL_FAILURES]
        written = await asyncio.gather(*(self._fail(item) for item in batch))
        return any(written)

    async def _fail(self, item: _Queued) -> bool:
        row, outcome = item.row, item.outcome
        error = storable_text(outcome.error or "unknown error")
        try:
            if outcome.snooze and outcome.retry_in_s is not None:
                status = await self._queue.snooze(
                    row,
                    self._worker_id,
                    error,
                    delay_s=outcome.retry_in_s,
                    max_snoozes=self._max_snoozes,
                    lease_s=self._lease_s,
                )
            else:
                status = await self._queue.fail(
                    row.id,
                    self._worker_id,
                    row.attempt,
                    error,
                    retryable=outcome.retryable,
                    retry_in_s=outcome.retry_in_s,
                    backoff_base_s=self._retry_base_s,
                    backoff_cap_s=self._retry_cap_s,
                )
        except Exception as exc:
            if isinstance(exc, DATABASE_ERRORS) and not is_data_error(exc):
                await self._health.failed("fail", exc)
                return False
            self._failures.remove(item)
            if not item.plain:
                # Something in the report cannot be stored (text the database's encoding
                # cannot hold, a retry delay out of range): send it again in plain ASCII
                # with the default backoff (a failure: a snooze's delay may be the cause).
                plain = error.encode("ascii", "backslashreplace").decode("ascii")
                again = Outcome(
                    error=plain, retryable=outcome.retryable, traceback_text=outcome.traceback_text
                )
                self._failures.append(replace(item, outcome=again, plain=True))
                return True
            self._inflight.settled(row)  # the reaper will return the chunk
            log.error(
                "chunk.outcome_unstorable",
                error=error,
                refused=first_line(exc),
                **self._fields(row, item.duration_ms, outcome),
            )
            return True
        self._health.wrote()
        self._failures.remove(item)
        self._inflight.settled(row)
        fields = self._fields(row, item.duration_ms, outcome)
        if outcome.snooze and status != "snoozed":
            # A RetryLater past the snooze limit is a failure like any other: say why.
            fields["snooze_limit_reached"] = self._max_snoozes
        if status is None:
            fenced = "snoozed" if outcome.snooze else "failed"
            self._fenced(row, item.duration_ms, fenced, error=error, outcome=outcome)
        elif status == "snoozed":
            self._for_kind(row.kind).snoozed.inc()
            self._progress.tally(row).snoozed += 1
            # Expected (a rate limit said when to come back), so info, not a warning.
            log.info("chunk.snoozed", delay_s=outcome.retry_in_s, reason=error, **fields)
        elif status == "pending":
            self._for_kind(row.kind).retried.inc()
            self._progress.tally(row).retried += 1
            log.warning("chunk.retry_scheduled", error=error, **fields)
        else:
            self._for_kind(row.kind).failed.inc()
            self._progress.tally(row).failed += 1
            log.error("chunk.failed", error=error, **fields)
        return True

    # --- reporting -----------------------------------------------------------------------

    def _fenced(
        self,
        row: ClaimedRow,
        duration_ms: float,
        name: str,
        outcome: Outcome | None = None,
        **extra: str,
    ) -> None:
        self._inflight.settled(row)
        self._metrics.fenced.inc()
        fields = self._fields(row, duration_ms, outcome)
        log.warning("chunk.fenced", outcome=name, **extra, **fields)

    def _for_kind(self, kind: str) -> _KindMetrics:
        # labels() looks the child up under a lock on every call: resolve once per kind.
        cached = self._by_kind.get(kind)
        if cached is None:
            m = self._metrics
            cached = self._by_kind[kind] = _KindMetrics(
                m.completed.labels(kind),
                m.failed.labels(kind),
                m.retried.labels(kind),
                m.snoozed.labels(kind),
            )
        return cached

    def _fields(
        self, row: ClaimedRow, duration_ms: float, outcome: Outcome | None = None
    ) -> dict[str, object]:
        # Built only when an event is logged: nothing is bound per chunk on the hot path.
        fields = row.log_fields(self._worker_id)
        fields["duration_ms"] = duration_ms
        if outcome is not None and outcome.traceback_text is not None:
            fields["exception"] = outcome.traceback_text  # the handler's, at debug only
        return fields
