"""What the operator commands do to jobs: enqueue, read progress, retry, cancel, reap, purge.

Every function takes a connection from :func:`chunkd.db.connect` and runs named statements from
``sql/queries.sql``; writes go through the SQL functions (enqueue through ``create_jobs``, the
function behind ``create_sync_job``), so the checks that protect an edge function calling
``create_sync_job`` over RPC protect the CLI too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.chunk import dumps_json
from chunkd.db.locks import DEFAULT_LOCK_WAIT_S
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.errors import database_errors, rows_of, run_locked
from chunkd.ops.flow import JobFlow
from chunkd.ops.workers import LEGACY_STALE_AFTER_S

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "TERMINAL_STATUSES",
    "Enqueued",
    "JobDetail",
    "JobRow",
    "cancel_job",
    "enqueue",
    "job_detail",
    "list_jobs",
    "purge_finished",
    "reap",
    "retry_failed",
]

TERMINAL_STATUSES = frozenset({"completed", "partial_failure", "cancelled"})
# An age that reaches from any time PostgreSQL's clock may show back past 0001-01-01 (6,000
# years of 365.25 days), and whose now() minus it PostgreSQL still holds (from 4713 BC).
_OLDEST_AGE_S = 6000 * 365.25 * 86400


@dataclass(frozen=True)
class Enqueued:
    """What ``enqueue`` did: ``created`` is False when an unfinished job of the same kind
    holds the dedupe key, and ``job_id`` is that job's."""

    job_id: UUID
    created: bool


async def enqueue(
    conn: asyncpg.Connection,
    *,
    kind: str,
    chunks: list[Any],
    payload: Any,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
    run_at: datetime | None = None,
    run_in_s: float | None = None,
    dedupe_key: str | None = None,
    open_job: bool = False,
    on_finish_kind: str | None = None,
    max_per_second: Decimal | None = None,
    concurrency_key: str | None = None,
    traceparent: str | None = None,
    label: str | None = None,
) -> Enqueued:
    """One job through ``create_jobs``, the function behind ``create_sync_job``: job, chunks
    and queue rows in one transaction. ``run_in_s`` (seconds from now by the database clock)
    takes the place of ``run_at``; ``open_job``: the job takes chunks from ``append`` until
    closed (``chunks`` may be empty); ``on_finish_kind``: the kind of the one-chunk job created
    when this one finishes; ``max_per_second``: the job's own rate limit (chunks per second);
    ``concurrency_key``: the key whose concurrency limit (``chunkd limit --key``) this job shares
    with others; ``traceparent``: the W3C trace context its chunks' spans join; ``label``: a
    text to find the job by (the dashboard shows and searches it). Numbers go as they were read
    (:class:`decimal.Decimal` written exactly, never through a float)."""
    spec = {
        "kind": kind,
        "chunks": chunks,
        "payload": payload,
        "max_concurrency": max_concurrency,
        "max_attempts": max_attempts,
        "priority": priority,
        "run_at": run_at.isoformat() if run_at is not None else None,
        "dedupe_key": dedupe_key,
        "open": open_job,
        "on_finish_kind": on_finish_kind,
        "max_per_second": max_per_second,
        "concurrency_key": concurrency_key,
        "traceparent": traceparent,
        "label": label,
    }
    with database_errors(conn):
        (row,) = await conn.fetch(
            queries()["ops_create_job"],
            dumps_json(spec, ensure_ascii=False),
            run_in_s,
        )
    return Enqueued(job_id=row["sync_job_id"], created=row["created"])


@dataclass(frozen=True)
class JobRow:
    """One line of the status table: the job's row of ``chunk_processing_status``."""

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
    run_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.overall_status in TERMINAL_STATUSES

    def as_json(self) -> dict[str, Any]:
        """The same keys as ``get_sync_job_progress`` uses, for scripts reading either."""
        return {
            "sync_job_id": str(self.sync_job_id),
            "kind": self.kind,
            "total_chunks": self.total_chunks,
            "pending_chunks": self.pending_chunks,
            "processing_chunks": self.processing_chunks,
            "completed_chunks": self.completed_chunks,
            "failed_chunks": self.failed_chunks,
            "cancelled_chunks": self.cancelled_chunks,
            "overall_status": self.overall_status,
            "progress_percentage": self.progress_percentage,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "run_at": self.run_at.isoformat() if self.run_at else None,
        }


async def list_jobs(conn: asyncpg.Connection, *, limit: int | None) -> tuple[list[JobRow], int]:
    """The newest ``limit`` jobs (None: all), newest first, and how many jobs exist.

    Three statements on purpose: the newest ids (through the created_at indexes of the live
    jobs and of the history), their rows (the view filtered by id reads only those jobs), and
    the total from the counts (the history's are kept as it changes: never a scan of it).
    """
    q = queries()
    with database_errors(conn):
        id_rows = await conn.fetch(q["ops_recent_job_ids"], limit)
        if not id_rows:
            return [], 0
        total = await conn.fetchval(q["ops_job_total"])
        rows = await conn.fetch(q["ops_job_status_rows"], [r["id"] for r in id_rows])
    jobs = [_job_row(r) for r in rows]
    return jobs, total


def _job_row(record: asyncpg.Record) -> JobRow:
    return JobRow(
        sync_job_id=record["parent_sync_job_id"],
        kind=record["kind"],
        total_chunks=record["total_chunks"],
        pending_chunks=record["pending_chunks"],
        processing_chunks=record["processing_chunks"],
        completed_chunks=record["completed_chunks"],
        failed_chunks=record["failed_chunks"],
        cancelled_chunks=record["cancelled_chunks"],
        overall_status=record["overall_status"],
        progress_percentage=float(record["progress_percentage"] or 0),
        created_at=record["created_at"],
        started_at=record["started_at"],
        finished_at=record["finished_at"],
        run_at=record["run_at"],
    )


@dataclass(frozen=True)
class JobDetail:
    """``status JOB``: the progress document, the job's settings, its latest errors, and
    whether any live worker can run it at all (a job of a kind nobody handles waits forever)."""

    progress: dict[str, Any]
    priority: int
    max_concurrency: int | None
    max_attempts: int
    recent_errors: list[dict[str, Any]]
    live_worker_for_kind: bool
    flow: JobFlow = field(default_factory=JobFlow)
    dedupe_key: str | None = None

    @property
    def kind(self) -> str:
        return str(self.progress["kind"])

    @property
    def overall_status(self) -> str:
        return str(self.progress["overall_status"])

    @property
    def terminal(self) -> bool:
        return self.overall_status in TERMINAL_STATUSES

    @property
    def note(self) -> str | None:
        """Why a job may not move: paused, or pending chunks and nobody alive to claim them."""
        if self.overall_status == "paused":
            if self.flow.paused_at is not None:
                return f"paused: `chunkd resume {self.progress['sync_job_id']}` resumes it"
            return f"kind {self.kind!r} paused: `chunkd resume --kind {self.kind}` resumes it"
        if self.progress.get("pending_chunks") and not self.live_worker_for_kind:
            return f"no live worker handles kind {self.kind!r}"
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            **self.progress,
            "priority": self.priority,
            "max_concurrency": self.max_concurrency,
            "max_attempts": self.max_attempts,
            "flow": self.flow.as_json(),
            "dedupe_key": self.dedupe_key,
            "live_worker_for_kind": self.live_worker_for_kind,
            "note": self.note,
            "recent_errors": self.recent_errors,
        }


async def job_detail(
    conn: asyncpg.Connection,
    job_id: UUID,
    *,
    stale_after_s: float | None = None,
    errors_limit: int = 10,
) -> JobDetail:
    """The job's progress, settings, latest errors, and whether a live worker can run its kind
    (heard from within ``stale_after_s`` seconds; None: within three of its own heartbeats, as
    the reaper counts)."""
    q = queries()
    with database_errors(conn):
        progress = await conn.fetchval(q["ops_job_progress"], job_id)
        settings = await conn.fetchrow(q["ops_job_settings"], job_id)
        if progress is None or settings is None:
            raise ChunkdError(f"no sync job {job_id}")
        errors = await conn.fetch(q["ops_recent_errors"], job_id, errors_limit)
        live = await conn.fetchval(
            q["ops_live_worker_for_kind"], progress["kind"], stale_after_s, LEGACY_STALE_AFTER_S
        )
    return JobDetail(
        progress=progress,
        priority=settings["priority"],
        max_concurrency=settings["max_concurrency"],
        max_attempts=settings["max_attempts"],
        recent_errors=[
            {
                "at": r["at"].isoformat(),
                "seq": r["seq"],
                "event": r["event"],
                "attempt": r["attempt"],
                "worker_id": r["worker_id"],
                "error": r["error"],
            }
            for r in errors
        ],
        live_worker_for_kind=bool(live),
        flow=JobFlow(
            paused_at=settings["paused_at"],
            max_per_second=settings["max_per_second"],
            job_burst=settings["job_burst"],
            concurrency_key=settings["concurrency_key"],
            key_max_concurrency=settings["key_max_concurrency"],
            kind_paused_at=settings["kind_paused_at"],
            kind_per_second=settings["kind_per_second"],
            kind_burst=settings["kind_burst"],
        ),
        dedupe_key=settings["dedupe_key"],
    )


async def retry_failed(
    conn: asyncpg.Connection, job_id: UUID, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Failed chunks back to pending with their attempts reset; how many. Lock waits as every
    operator action (:func:`chunkd.ops.errors.run_locked`)."""
    count: int = await run_locked(
        conn,
        queries()["ops_retry_failed_chunks"],
        job_id,
        what=f"retry of job {job_id}",
        wanted=rows_of("jobs"),
        wait_s=lock_wait_s,
    )
    return count


async def cancel_job(
    conn: asyncpg.Connection, job_id: UUID, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Pending and processing chunks to cancelled; how many. Lock waits as every operator
    action (:func:`chunkd.ops.errors.run_locked`).

    Raises :class:`~chunkd.errors.ChunkdError` when there is nothing to cancel because the job
    is already finished (naming its status), or does not exist.
    """
    q = queries()
    count: int = await run_locked(
        conn,
        q["ops_cancel_sync_job"],
        job_id,
        what=f"cancel of job {job_id}",
        wanted=rows_of("jobs", "ready", "scheduled", "attempts"),
        wait_s=lock_wait_s,
    )
    if count == 0:
        # cancel_sync_job returns 0 alike for a finished job and one that cancels nothing.
        with database_errors(conn):
            progress = await conn.fetchval(q["ops_job_progress"], job_id)
        if progress is None:
            raise ChunkdError(f"no sync job {job_id}")
        status = progress["overall_status"]
        if status in TERMINAL_STATUSES:
            raise ChunkdError(f"job {job_id} is already finished ({status}): nothing to cancel")
    return count


async def reap(conn: asyncpg.Connection) -> int:
    """Chunks whose lease expired back to pending (or failed); how many."""
    with database_errors(conn):
        count: int = await conn.fetchval(queries()["ops_reap"])
    return count


async def purge_finished(
    conn: asyncpg.Connection, older_than_s: float, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Jobs finished more than ``older_than_s`` ago, deleted with all their rows; how many.
    Jobs another session holds are skipped (SKIP LOCKED); lock waits as every operator action."""
    # chunkd stores no time before 0001-01-01 (chunkd.times), so an age beyond what reaches back
    # there purges the same jobs as that age, and now() minus it stays a time PostgreSQL holds.
    older_than_s = min(older_than_s, _OLDEST_AGE_S)
    count: int = await run_locked(
        conn,
        queries()["ops_purge_finished_jobs"],
        timedelta(seconds=older_than_s),
        what="purge",
        wanted=rows_of("jobs", "chunks", "attempts", "events"),
        wait_s=lock_wait_s,
    )
    return count
