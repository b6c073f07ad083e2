"""A job's progress as the client returns it: ``get_sync_job_progress``'s keys, typed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID

__all__ = ["Progress"]

TERMINAL_STATUSES = frozenset({"completed", "partial_failure", "cancelled"})


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Progress:
    """One job's progress (``chunkd.get_sync_job_progress``), by the database clock.

    Counts are chunks; ``overall_status`` is ``scheduled`` (its ``run_at`` lies ahead and
    nothing has started), ``pending``, ``processing``, ``completed``, ``partial_failure`` or
    ``cancelled``; ``progress_percentage`` is finished chunks / total x 100 (0-100, two
    decimals); times are aware datetimes (``run_at`` None: not delayed); ``chunks_per_second``
    counts completed and failed chunks since the first claim (None before it), and
    ``eta_seconds`` is the remaining chunks at that rate (None: unknown, 0: finished).
    ``open``: the job takes appended chunks until closed; ``total_is_final`` is false while
    chunks may still be appended (an open job, or one growing by continuations), and
    ``appended_chunks`` counts those added by continuations; ``on_finish_kind`` is the kind of
    the follow-up job created when it finishes (None: none); ``label`` is the text the job was
    created with to find it by (None: none).
    """

    sync_job_id: UUID
    kind: str
    total_chunks: int
    pending_chunks: int
    processing_chunks: int
    completed_chunks: int
    failed_chunks: int
    cancelled_chunks: int
    overall_status: str
    progress_percentage: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime | None
    chunks_per_second: float | None
    eta_seconds: float | None
    open: bool = False
    total_is_final: bool = True
    appended_chunks: int = 0
    on_finish_kind: str | None = None
    label: str | None = None

    @property
    def finished(self) -> bool:
        """Every chunk is completed, failed or cancelled (a dedupe key is free again)."""
        return self.overall_status in TERMINAL_STATUSES

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Progress:
        """From the function's JSON object; keys a newer schema adds are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values.setdefault("run_at", None)
        return cls(
            **{
                **values,
                "sync_job_id": UUID(str(doc["sync_job_id"])),
                "progress_percentage": float(doc["progress_percentage"] or 0),
                "created_at": datetime.fromisoformat(doc["created_at"]),
                "started_at": _time(doc.get("started_at")),
                "finished_at": _time(doc.get("finished_at")),
                "run_at": _time(values["run_at"]),
                "chunks_per_second": _number(doc.get("chunks_per_second")),
                "eta_seconds": _number(doc.get("eta_seconds")),
            }
        )
