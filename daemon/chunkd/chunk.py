"""The chunk handed to handlers, the two exceptions handlers raise to steer retries, and
``Continue``, which a handler returns to add chunks to its own job.

These names are public API: handlers written by users import them from ``chunkd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

__all__ = ["Chunk", "Continue", "PermanentError", "RetryLater"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One claimed chunk, immutable so a handler cannot corrupt what the worker reports.

    ``idempotency_key`` stays the same across attempts of the same chunk: handlers run at
    least once, so anything they write outside Postgres should be keyed on it.
    """

    queue_id: UUID
    chunk_id: UUID
    sync_job_id: UUID
    seq: int
    attempt: int
    kind: str
    payload: Any
    job_payload: Any

    @property
    def idempotency_key(self) -> str:
        # The chunk id never changes between attempts (the queue row may be re-claimed,
        # the chunk definition may not), so it is the stable key.
        return f"chunkd:{self.chunk_id}"

    def to_json_dict(self) -> dict[str, Any]:
        """The wire form used by the http and exec handlers."""
        return {
            "queue_id": str(self.queue_id),
            "chunk_id": str(self.chunk_id),
            "sync_job_id": str(self.sync_job_id),
            "seq": self.seq,
            "attempt": self.attempt,
            "kind": self.kind,
            "payload": self.payload,
            "job_payload": self.job_payload,
            "idempotency_key": self.idempotency_key,
        }


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help: the chunk fails at once."""


class RetryLater(Exception):
    """Raised by a handler to retry after ``delay_s`` seconds (an attempt is still spent)."""

    def __init__(self, delay_s: float, message: str = "") -> None:
        if delay_s < 0:
            raise ValueError("RetryLater delay_s must be >= 0")
        super().__init__(message or f"retry requested in {delay_s}s")
        self.delay_s = float(delay_s)


@dataclass(frozen=True, slots=True)
class Continue:
    """Returned by a handler: complete this chunk with ``result`` and append ``chunks`` to its
    job (a continuation: the next page, the next UID range).

    The chunks are appended in the same transaction as the completion, and only if the
    completion is accepted: a stale worker (its lease was lost and the chunk re-claimed)
    appends nothing. They take the job's next ``seq`` values, so a ``max_concurrency = 1`` job
    runs them in order after this chunk. ``result`` is any JSON value (or None); ``chunks`` is
    a sequence of JSON chunk payloads (empty: a plain completion). Limits as for enqueue: at
    most 16 MiB of chunks per call and 1,000,000 chunks per job; a ``Continue`` over them fails
    the chunk at once (``PermanentError``).
    """

    result: Any = None
    chunks: Sequence[Any] = ()
