"""A handler's ``Continue`` as an outcome: its result and the chunks it appends, as JSON.

Checked here, before anything is written, against the same limits as enqueue, so a
continuation that the database would refuse fails its chunk at once with a clear error (the
same code would return the same chunks next time).
"""

from __future__ import annotations

from collections.abc import Sequence

from chunkd.chunk import MAX_RESULT_BYTES, Continue, dumps_json
from chunkd.runtime.outcomes import Outcome

__all__ = ["MAX_APPEND_BYTES", "continuation_outcome"]

# create_sync_job's limit on a job's chunks, per call (jsonb as stored is about this size).
MAX_APPEND_BYTES = 16 * 1024 * 1024


def continuation_outcome(value: Continue) -> Outcome:
    """The completion-with-append outcome of ``value``, or a permanent failure explaining why
    it cannot be stored."""
    chunks = value.chunks
    if isinstance(chunks, str | bytes | dict) or not isinstance(chunks, Sequence):
        return _refused(f"Continue.chunks must be a list of chunk payloads, got {type(chunks)}")
    try:
        # dumps_json: a Decimal (as handlers get for non-integers) is written exactly.
        result_json = None if value.result is None else dumps_json(value.result)
        append_json = dumps_json(list(chunks))
    except (TypeError, ValueError, RecursionError) as exc:
        return _refused(f"Continue holds a value that is not JSON: {exc}")
    if result_json is not None and len(result_json) > MAX_RESULT_BYTES:
        return _refused(
            f"handler result is {len(result_json)} bytes, above the {MAX_RESULT_BYTES}-byte limit"
        )
    if len(append_json) > MAX_APPEND_BYTES:
        return _refused(
            f"Continue.chunks are {len(append_json)} bytes, above the 16 MiB limit per call"
        )
    if "\\u0000" in append_json:
        return _refused("Continue.chunks contain \\u0000, which PostgreSQL's jsonb cannot store")
    return Outcome(result_json=result_json, append_json=append_json)


def _refused(error: str) -> Outcome:
    return Outcome(error=error, retryable=False)
