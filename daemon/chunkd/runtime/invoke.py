"""Calling a handler with one chunk and turning whatever it did into an outcome.

One place for what a handler's behaviour means, shared by the daemon's worker and by
:mod:`chunkd.testing` (which runs handlers in-process through the same code): a return value is
a completion (a :class:`~chunkd.chunk.Continue` appends chunks; a result that is not JSON, or
above 1 MiB, fails the chunk for good), an exception a failure (``PermanentError``: for good;
``RetryLater``: snoozed for its delay, no attempt spent; anything else, ``SystemExit`` and a
``CancelledError`` of the handler's own included: retried with backoff), and the chunk timeout
a retryable failure. A cancellation that is not the handler's own (the lease is lost, the
daemon stops) is raised again: such a chunk gets no outcome from this worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from chunkd.runtime.outcomes import Outcome, describe_exception

__all__ = ["Invocation", "chunk_of", "invoke"]


@dataclass(frozen=True, slots=True)
class Invocation:
    """What one call of a handler came to: the ``outcome`` to record, and the exception the
    handler raised (None when it returned), for callers that show it (``chunkd.testing``)."""

    outcome: Outcome
    raised: BaseException | None = None


def chunk_of(row: ClaimedRow) -> Chunk[Any, Any]:
    """The :class:`~chunkd.chunk.Chunk` a handler gets for a claimed row (payloads decoded only
    when first read, every number exactly as stored)."""
    return Chunk.from_json(
        queue_id=row.queue_id,
        chunk_id=row.chunk_id,
        sync_job_id=row.sync_job_id,
        seq=row.seq,
        attempt=row.attempt,
        kind=row.kind,
        payload_json=row.payload_json,
        job_payload_json=row.job_payload_json,
    )


async def invoke(
    handler: Handler, chunk: Chunk[Any, Any], *, timed_out: Callable[[], bool], timeout_s: float
) -> Invocation:
    """Calls ``handler(chunk)`` in the current task and returns what it came to.

    Args:
        handler: the chunk's handler.
        chunk: the chunk, as :func:`chunk_of` builds it.
        timed_out: whether the current task was cancelled by the chunk timeout (whoever
            enforces the timeout cancels the task and says so here).
        timeout_s: the chunk timeout in seconds, for the failure's message.

    Raises:
        asyncio.CancelledError: the task was cancelled by someone else than the timeout (a
            lost lease, a stop), whatever the handler made of the cancellation.
    """
    try:
        result = await handler(chunk)
    except (
        Exception,
        asyncio.CancelledError,
        SystemExit,
        KeyboardInterrupt,
        GeneratorExit,
    ) as exc:
        # SystemExit too: a handler calling sys.exit() fails its chunk, not the daemon.
        return Invocation(_failure(exc, timed_out, timeout_s), exc)
    if timed_out():
        # It swallowed the timeout's cancellation and returned: its result stands.
        _uncancel_timeout()
    return Invocation(outcome_of_result(result))


def outcome_of_result(result: Any) -> Outcome:
    """The outcome of a handler that returned ``result``."""
    if isinstance(result, Continue):
        from chunkd.runtime.continuation import continuation_outcome

        return continuation_outcome(result)
    try:
        # dumps_json: a Decimal (as handlers get for non-integers) is written exactly.
        result_json = None if result is None else dumps_json(result)
    except (TypeError, ValueError, RecursionError) as exc:
        # Deterministic: the same code returns the same value next time. Fail for good.
        return Outcome(error=f"handler returned a value that is not JSON: {exc}", retryable=False)
    if result_json is not None and len(result_json) > MAX_RESULT_BYTES:
        error = f"handler result is {len(result_json)} bytes, above the {MAX_RESULT_BYTES}"
        return Outcome(error=f"{error}-byte limit (store big results elsewhere)", retryable=False)
    return Outcome(result_json=result_json)


def _failure(exc: BaseException, timed_out: Callable[[], bool], timeout_s: float) -> Outcome:
    """The outcome of a handler that raised ``exc`` (or was cancelled)."""
    if timed_out():
        # The chunk timeout cancelled it, whatever the handler made of the cancellation.
        if _uncancel_timeout():
            return Outcome(error=f"timed out after {timeout_s:g}s")
        raise exc if isinstance(exc, asyncio.CancelledError) else asyncio.CancelledError()
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise exc  # not the handler's own: the lease is gone, or a stop
        # The handler's own (it cancelled an inner task and let that propagate): a failure
        # of this chunk like any other exception, not a reason to drop the chunk.
        return Outcome(error=describe_exception(exc))
    if isinstance(exc, PermanentError):
        return Outcome(error=describe_exception(exc), retryable=False)
    if isinstance(exc, RetryLater):
        # A snooze: no attempt spent, up to --max-snoozes times (chunkd.snooze_attempt).
        return Outcome(error=describe_exception(exc), retry_in_s=exc.delay_s, snooze=True)
    undecodable = _undecodable_cause(exc)
    if undecodable is not None:
        # Raised from (or while handling) a payload that can never be decoded: every
        # attempt would end the same way, whatever the handler made of it.
        error = f"{describe_exception(exc)} (from {describe_exception(undecodable)})"
        return Outcome(error=error, retryable=False)
    return Outcome(error=describe_exception(exc))


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


def _uncancel_timeout() -> bool:
    """Takes back the timeout's cancellation of this task; False when another one (a lost
    lease, a stop) is still pending."""
    task = asyncio.current_task()
    return task is None or task.uncancel() == 0
