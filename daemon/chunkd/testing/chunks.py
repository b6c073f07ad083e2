"""``make_chunk``: a Chunk exactly as the daemon hands it to a handler, without a database."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any
from uuid import UUID

from chunkd.app import App
from chunkd.app.payloads import as_json_values
from chunkd.chunk import Chunk, dumps_json, loads_json

__all__ = ["make_chunk"]


def _jsonb_text(value: Any) -> str:
    """JSON values as PostgreSQL prints jsonb: object keys once each, shorter keys first
    (then bytewise), numbers in positional notation with the scale they were written with."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        items = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_jsonb_text(value[k])}"
                          for k in keys)  # fmt: skip
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return format(value.copy_abs() if value.is_zero() else value, "f")
    return json.dumps(value, ensure_ascii=False)


def make_chunk(
    payload: Any = None,
    job_payload: Any = None,
    *,
    kind: str = "test",
    app: App | None = None,
    seq: int = 0,
    attempt: int = 1,
    chunk_id: UUID | None = None,
    queue_id: UUID | None = None,
    sync_job_id: UUID | None = None,
) -> Chunk[Any, Any]:
    """A :class:`~chunkd.Chunk` as the daemon builds it for a handler: the payloads go through
    JSON as the database stores them, so numbers arrive as ``int`` or ``Decimal`` (never a
    float: ``{"x": 1.5}`` gives ``Decimal("1.5")``), keys in jsonb's order, and the
    ``idempotency_key`` is ``chunkd:<chunk_id>``.

    Args:
        payload: the chunk's payload: JSON values, or an instance of a payload type (a
            dataclass, a pydantic model), as stored; None: ``{}``.
        job_payload: the job's payload, likewise; None: ``{}``.
        kind: the job's kind.
        app: when given, the chunk is typed as ``app``'s handler of ``kind`` receives it
            (``Chunk[MailPage, Mailbox]``), payloads validated as the daemon validates them.
        seq, attempt: the chunk's position in its job and its attempt (from 1).
        chunk_id, queue_id, sync_job_id: its ids; None: new random ones.

    Raises:
        chunkd.PermanentError: with ``app``, a payload does not validate (what the daemon
            would fail the chunk with).
        chunkd.InvalidInputError: with ``app``, a payload is not of the handler's type, or
            ``kind`` has no handler in it.
        TypeError, ValueError: a payload is not JSON.
    """
    payload = {} if payload is None else payload
    job_payload = {} if job_payload is None else job_payload
    if app is not None:
        chunks, job = app.encode(kind, [payload], job_payload)
        payload, job_payload = chunks[0], job
    payload, job_payload = as_json_values(payload), as_json_values(job_payload)
    chunk = Chunk.from_json(
        queue_id or uuid.uuid4(), chunk_id or uuid.uuid4(), sync_job_id or uuid.uuid4(), seq,
        attempt, kind,
        payload_json=_jsonb_text(loads_json(dumps_json(payload))),
        job_payload_json=_jsonb_text(loads_json(dumps_json(job_payload))),
    )  # fmt: skip
    return chunk if app is None else app.registered(kind).typed(chunk)
