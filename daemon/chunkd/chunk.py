"""The chunk handed to handlers, the two exceptions handlers raise to steer retries,
``Continue``, which a handler returns to add chunks to its own job, and the exact JSON that
carries payloads and results.

These names are public API: handlers written by users import them from ``chunkd``.

Numbers are never changed on their way: a claimed chunk keeps its payloads as the JSON text the
database returned, so ``http:`` and ``exec:`` handlers receive that text unchanged, and a
Python handler gets it decoded on first use with :class:`decimal.Decimal` for every number that
is not an integer (a float would turn ``1234567890.123456789012345`` into
``1234567890.1234567`` and ``1e-400`` into ``0.0``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, Generic
from uuid import UUID

from typing_extensions import TypeVar

from chunkd.json_text import (
    MAX_RESULT_BYTES,
    JSONTooDeepError,
    dumps_json,
    loads_json,
    too_deep,
)

__all__ = [
    "MAX_RESULT_BYTES",
    "Chunk",
    "Continue",
    "JSONTooDeepError",
    "PermanentError",
    "RetryLater",
    "UndecodablePayloadError",
    "dumps_json",
    "loads_json",
    "too_deep",
]

_UNDECODED: Any = object()

# The types of a chunk's payload and job payload: ``Chunk[MailPage, Mailbox]`` for a handler
# registered with those payload types (chunkd.App), plain ``Chunk`` (decoded JSON) otherwise.
P = TypeVar("P", default=Any)
J = TypeVar("J", default=Any)


class Chunk(Generic[P, J]):
    """One claimed chunk, immutable so a handler cannot corrupt what the worker reports.

    ``payload`` and ``job_payload`` are the decoded JSON (numbers exact: :class:`int`, or
    :class:`decimal.Decimal` for non-integers), or, for a handler registered on a
    :class:`chunkd.App` with payload types, instances of those types
    (``Chunk[MailPage, Mailbox]``). ``idempotency_key`` stays the same across attempts of the
    same chunk: handlers run at least once, so anything they write outside Postgres should be
    keyed on it.
    """

    __slots__ = (
        "_job_payload",
        "_job_payload_json",
        "_payload",
        "_payload_json",
        "attempt",
        "chunk_id",
        "kind",
        "queue_id",
        "seq",
        "sync_job_id",
    )
    queue_id: UUID
    chunk_id: UUID
    sync_job_id: UUID
    seq: int
    attempt: int
    kind: str
    _payload: Any
    _job_payload: Any
    _payload_json: str | None
    _job_payload_json: str | None

    def __init__(
        self,
        queue_id: UUID,
        chunk_id: UUID,
        sync_job_id: UUID,
        seq: int,
        attempt: int,
        kind: str,
        payload: Any,
        job_payload: Any,
    ) -> None:
        self._set(queue_id, chunk_id, sync_job_id, seq, attempt, kind)
        object.__setattr__(self, "_payload", payload)
        object.__setattr__(self, "_job_payload", job_payload)
        object.__setattr__(self, "_payload_json", None)
        object.__setattr__(self, "_job_payload_json", None)

    @classmethod
    def from_json(
        cls,
        queue_id: UUID,
        chunk_id: UUID,
        sync_job_id: UUID,
        seq: int,
        attempt: int,
        kind: str,
        *,
        payload_json: str,
        job_payload_json: str,
    ) -> Chunk[Any, Any]:
        """A chunk whose payloads are JSON text, as claimed: decoded only when first read."""
        chunk: Chunk[Any, Any] = cls.__new__(cls)
        chunk._set(queue_id, chunk_id, sync_job_id, seq, attempt, kind)
        object.__setattr__(chunk, "_payload", _UNDECODED)
        object.__setattr__(chunk, "_job_payload", _UNDECODED)
        object.__setattr__(chunk, "_payload_json", payload_json)
        object.__setattr__(chunk, "_job_payload_json", job_payload_json)
        return chunk

    def _set(
        self, queue_id: UUID, chunk_id: UUID, sync_job_id: UUID, seq: int, attempt: int, kind: str
    ) -> None:
        for name, value in (
            ("queue_id", queue_id),
            ("chunk_id", chunk_id),
            ("sync_job_id", sync_job_id),
            ("seq", seq),
            ("attempt", attempt),
            ("kind", kind),
        ):
            object.__setattr__(self, name, value)

    @property
    def payload(self) -> P:
        """The chunk's own payload, decoded JSON (decoded when first read: a payload Python
        cannot decode raises :class:`UndecodablePayloadError` here, in the handler that reads
        it, and fails the chunk without retries)."""
        if self._payload is _UNDECODED:
            assert self._payload_json is not None
            object.__setattr__(self, "_payload", _decode("payload", self._payload_json))
        return self._payload  # type: ignore[no-any-return]

    @property
    def job_payload(self) -> J:
        """The job's payload (the same for every chunk of the job), decoded JSON; raises
        :class:`UndecodablePayloadError` as :attr:`payload` does."""
        if self._job_payload is _UNDECODED:
            assert self._job_payload_json is not None
            object.__setattr__(self, "_job_payload", _decode("job payload", self._job_payload_json))
        return self._job_payload  # type: ignore[no-any-return]

    def with_payloads(self, payload: Any, job_payload: Any) -> Chunk[Any, Any]:
        """This chunk with other payload values (the typed payloads :class:`chunkd.App` hands
        its handlers); the ids are the same, and the JSON wire form (:meth:`to_json`) stays the
        text the chunk was claimed with."""
        chunk: Chunk[Any, Any] = Chunk.__new__(Chunk)
        chunk._set(self.queue_id, self.chunk_id, self.sync_job_id, self.seq, self.attempt,
                   self.kind)  # fmt: skip
        object.__setattr__(chunk, "_payload", payload)
        object.__setattr__(chunk, "_job_payload", job_payload)
        object.__setattr__(chunk, "_payload_json", self._payload_json)
        object.__setattr__(chunk, "_job_payload_json", self._job_payload_json)
        return chunk

    @property
    def idempotency_key(self) -> str:
        # The chunk id never changes between attempts (the queue row may be re-claimed,
        # the chunk definition may not), so it is the stable key.
        return f"chunkd:{self.chunk_id}"

    def to_json_dict(self) -> dict[str, Any]:
        """The wire form used by the http and exec handlers, as Python values."""
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

    def to_json(self) -> str:
        """The wire form as JSON text, with the payloads exactly as stored (never re-encoded).

        Raises :class:`TypeError` or :class:`ValueError` when a payload given as Python values
        is not JSON.
        """
        payload = self._payload_json
        if payload is None:
            payload = dumps_json(self._payload)
        job_payload = self._job_payload_json
        if job_payload is None:
            job_payload = dumps_json(self._job_payload)
        return (
            f'{{"queue_id":"{self.queue_id}","chunk_id":"{self.chunk_id}",'
            f'"sync_job_id":"{self.sync_job_id}","seq":{int(self.seq)},'
            f'"attempt":{int(self.attempt)},"kind":{json.dumps(self.kind)},'
            f'"payload":{payload},"job_payload":{job_payload},'
            f'"idempotency_key":{json.dumps(self.idempotency_key)}}}'
        )

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.queue_id,
            self.chunk_id,
            self.sync_job_id,
            self.seq,
            self.attempt,
            self.kind,
            self.payload,
            self.job_payload,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        # Never raises (a log line of a handler's chunk must not fail on its payload).
        def shown(read: Callable[[], Any]) -> str:
            try:
                return repr(read())
            except (UndecodablePayloadError, RecursionError):
                return "<nested too deeply for Python>"

        return (
            f"Chunk(queue_id={self.queue_id!r}, chunk_id={self.chunk_id!r}, "
            f"sync_job_id={self.sync_job_id!r}, seq={self.seq!r}, attempt={self.attempt!r}, "
            f"kind={self.kind!r}, payload={shown(lambda: self.payload)}, "
            f"job_payload={shown(lambda: self.job_payload)})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (a process pool, say) although __setattr__ refuses: rebuilt, not restored;
        # a claimed chunk keeps its JSON text (what http: and exec: handlers are given).
        ids = (self.queue_id, self.chunk_id, self.sync_job_id, self.seq, self.attempt, self.kind)
        if self._payload_json is not None and self._job_payload_json is not None:
            return (_chunk_from_json, (*ids, self._payload_json, self._job_payload_json))
        return (Chunk, (*ids, self._payload, self._job_payload))

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")


def _decode(what: str, text: str) -> Any:
    try:
        return loads_json(text)
    except ValueError as exc:  # JSONTooDeepError; JSONDecodeError for text given by hand
        message = too_deep("JSON") if isinstance(exc, JSONTooDeepError) else str(exc)
        raise UndecodablePayloadError(f"chunk {what} cannot be decoded: {message}") from None


def _chunk_from_json(*args: Any) -> Chunk[Any, Any]:
    *ids, payload_json, job_payload_json = args
    return Chunk.from_json(*ids, payload_json=payload_json, job_payload_json=job_payload_json)


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help: the chunk fails at once."""


class UndecodablePayloadError(PermanentError, ValueError):
    """Raised when a handler reads a payload (:attr:`Chunk.payload`, :attr:`Chunk.job_payload`)
    that Python cannot decode: JSON nested deeper than its recursion limit (the only JSON
    that jsonb stores and Python cannot read). Every attempt would fail the same way, so the
    chunk fails at once, without retries, also when the handler raises another exception
    from it (``raise ... from exc``, or while handling it)."""


class RetryLater(Exception):
    """Raised by a handler to run its chunk again after ``delay_s`` seconds (a rate limit's
    ``Retry-After``): a *snooze*, which does not spend one of the job's ``max_attempts``.

    The chunk keeps its attempt number and its place (a ``max_concurrency = 1`` job waits for
    it), and the audit trail records a ``snoozed`` row with the delay and this exception's
    message. A chunk is snoozed at most ``chunkd run --max-snoozes`` times (20 by default);
    a ``RetryLater`` past that counts as a failed attempt retried after ``delay_s``. Raises
    :class:`ValueError` when ``delay_s`` is negative.
    """

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
