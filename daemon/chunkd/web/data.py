"""What each page reads: one function per page or fragment, on the named statements of
``sql/web.sql`` (the public views and functions only). Server errors become one-line
:class:`~chunkd.errors.ChunkdError` messages (:func:`chunkd.ops.database_errors`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.db.sql_files import queries
from chunkd.ops import TERMINAL_STATUSES, database_errors
from chunkd.ops.workers import LEGACY_STALE_AFTER_S

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "JOB_STATUSES",
    "MAX_SEARCH_CHARS",
    "PAGE_SIZE",
    "QUEUE_STATUSES",
    "ChunkDetail",
    "FlowControls",
    "JobPage",
    "JobsListing",
    "QueueDepth",
    "chunk_detail",
    "chunk_map",
    "chunk_payload",
    "job_page",
    "job_payload",
    "job_progress",
    "job_state",
    "jobs_listing",
    "kind_state",
    "queue_depth",
    "queue_totals",
    "search_problem",
    "workers",
]

PAGE_SIZE = 50
# The longest search: a dedupe key's limit (kinds and labels end at 200 characters).
MAX_SEARCH_CHARS = 256
# Every overall_status, in the order a job goes through them (the filter's and the counts').
JOB_STATUSES = (
    "scheduled", "pending", "processing", "paused", "completed", "partial_failure", "cancelled"
)  # fmt: skip
# queue_depth()'s statuses: due chunks free to run, held by a pause, held by a rate or key limit;
# waiting for a retry or a later start; claimed.
QUEUE_STATUSES = ("pending", "paused", "throttled", "scheduled", "processing")
THROUGHPUT_BUCKETS = 60
JOB_EVENTS_LIMIT = 20


def _sql() -> dict[str, str]:
    return queries("web.sql")


@dataclass(frozen=True)
class JobsListing:
    """One page of the jobs list: ``rows`` (dicts of ``web_jobs_page``), whether a next page
    exists, the jobs of the chosen kind by status (None while searching: the counts are not
    those of the matches), every kind (for the filter), and the chosen kind's ``kind_state``
    row (None: no kind chosen)."""

    rows: list[dict[str, Any]]
    has_next: bool
    facets: dict[str, int] | None
    kinds: list[str]
    kind_state: dict[str, Any] | None = None


def search_problem(search: str | None) -> str | None:
    """Why ``search`` (stripped) cannot be searched for, in one line; None when it can."""
    if search is None:
        return None
    if len(search) > MAX_SEARCH_CHARS:
        return (
            f"a search is at most {MAX_SEARCH_CHARS} characters (the start of a kind, a label, "
            f"a dedupe key or a job id), got {len(search)}"
        )
    if "\x00" in search:
        return "a search cannot contain a NUL character (no kind, label or dedupe key can)"
    return None


async def jobs_listing(
    pool: asyncpg.Pool,
    *,
    kind: str | None,
    status: str | None,
    page: int,
    search: str | None = None,
) -> JobsListing:
    """One page of jobs, newest first, of ``kind`` and ``status`` (None: any) matching
    ``search`` (None: every job; see ``chunkd.search_sync_jobs``), which
    :func:`search_problem` must have passed."""
    q = _sql()
    with database_errors():
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                q["web_jobs_page"], search, kind, status, PAGE_SIZE + 1, (page - 1) * PAGE_SIZE
            )
            facets = None if search else await conn.fetch(q["web_job_facets"], kind)
            kinds = await conn.fetch(q["web_kinds"])
            state = await conn.fetchrow(q["web_kind_state"], kind) if kind else None
    shown = [_with_eta(dict(r)) for r in rows[:PAGE_SIZE]]
    return JobsListing(
        rows=shown,
        has_next=len(rows) > PAGE_SIZE,
        facets=None if facets is None else {r["overall_status"]: r["jobs"] for r in facets},
        kinds=[r["kind"] for r in kinds],
        kind_state=None if state is None else dict(state),
    )


async def kind_state(pool: asyncpg.Pool, kind: str) -> dict[str, Any]:
    """Kind ``kind``'s ``chunkd.kind_state`` row: its pause, its rate, its chunks processing and
    pending and its unfinished jobs."""
    with database_errors():
        row = await pool.fetchrow(_sql()["web_kind_state"], kind)
    assert row is not None  # kind_state always returns one row
    return dict(row)


def _with_eta(row: dict[str, Any]) -> dict[str, Any]:
    """Adds ``eta_seconds`` and ``terminal`` the way get_sync_job_progress defines them."""
    remaining = row["pending_chunks"] + row["processing_chunks"]
    rate = row.get("chunks_per_second")
    row["eta_seconds"] = 0 if remaining == 0 else (remaining / rate if rate else None)
    row["terminal"] = row["overall_status"] in TERMINAL_STATUSES
    return row


async def job_progress(pool: asyncpg.Pool, job_id: UUID) -> dict[str, Any] | None:
    """``get_sync_job_progress(job_id)`` as a dict, or None when there is no such job."""
    with database_errors():
        progress: dict[str, Any] | None = await pool.fetchval(_sql()["web_job_progress"], job_id)
    return progress


@dataclass(frozen=True)
class FlowControls:
    """The flow controls that apply to one job (``chunkd.job_flow``): its own pause and rate
    (chunks per second, burst and tokens now), its concurrency key with the key's limit (None:
    no limit) and chunks processing now, its kind's pause and rate."""

    paused_at: datetime | None = None
    max_per_second: Decimal | None = None
    burst: int | None = None
    tokens: float | None = None
    concurrency_key: str | None = None
    key_max_concurrency: int | None = None
    key_processing: int | None = None
    kind_paused_at: datetime | None = None
    kind_per_second: Decimal | None = None
    kind_burst: int | None = None
    kind_tokens: float | None = None

    @property
    def paces(self) -> bool:
        """Whether a rate or a concurrency key applies (the pauses have notes of their own)."""
        return any(
            v is not None for v in (self.max_per_second, self.concurrency_key, self.kind_per_second)
        )


async def job_state(pool: asyncpg.Pool, job_id: UUID) -> tuple[dict[str, Any], FlowControls] | None:
    """A job's progress and flow controls (what the actions decide on), or None when there is
    no such job."""
    q = _sql()
    with database_errors():
        async with pool.acquire() as conn:
            progress = await conn.fetchval(q["web_job_progress"], job_id)
            flow = await conn.fetchrow(q["web_job_flow"], job_id)
    if progress is None or flow is None:
        return None
    return progress, FlowControls(**dict(flow))


@dataclass(frozen=True)
class JobPage:
    """The job detail page: progress (the ``get_sync_job_progress`` keys), settings, flow
    controls, the throughput chart's buckets, the latest errors and the job's own events
    (``chunkd.job_events``: paused, resumed, job_finished, ...), newest first."""

    progress: dict[str, Any]
    settings: dict[str, Any]
    bucket_s: float
    flow: FlowControls = field(default_factory=FlowControls)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    live_worker: bool = True

    @property
    def note(self) -> str | None:
        """Why the job may not move: chunks wait and no live worker handles its kind."""
        if self.progress["pending_chunks"] and not self.live_worker:
            return f"no live worker handles kind {self.progress['kind']!r}"
        return None

    @property
    def terminal(self) -> bool:
        return self.progress["overall_status"] in TERMINAL_STATUSES


def _bucket_s(started_at: datetime, until: datetime) -> float:
    """Bucket width for the chart: about THROUGHPUT_BUCKETS buckets, at least one second."""
    span_s = max((until - started_at).total_seconds(), 1.0)
    return float(max(1, int(span_s / THROUGHPUT_BUCKETS) + 1))


async def job_page(
    pool: asyncpg.Pool, job_id: UUID, *, stale_after_s: float | None, errors_limit: int = 10
) -> JobPage | None:
    q = _sql()
    with database_errors():
        async with pool.acquire() as conn:
            progress = await conn.fetchval(q["web_job_progress"], job_id)
            settings = await conn.fetchrow(q["web_job_settings"], job_id)
            flow = await conn.fetchrow(q["web_job_flow"], job_id)
            if progress is None or settings is None or flow is None:
                return None
            throughput: list[dict[str, Any]] = []
            bucket_s = 1.0
            started = settings["created_at"]
            if progress["started_at"] is not None:
                started = datetime.fromisoformat(progress["started_at"])
                now = await conn.fetchval("SELECT now()")
                until = (
                    datetime.fromisoformat(progress["finished_at"])
                    if progress["finished_at"]
                    else now
                )
                bucket_s = _bucket_s(started, until)
                rows = await conn.fetch(q["web_job_throughput"], job_id, bucket_s, started)
                throughput = _fill_buckets([dict(r) for r in rows], started, until, bucket_s)
            errors = await conn.fetch(q["web_job_errors"], job_id, errors_limit)
            events = await conn.fetch(q["web_job_events"], job_id, JOB_EVENTS_LIMIT)
            live = await conn.fetchval(
                q["web_live_worker_for_kind"], progress["kind"], stale_after_s, LEGACY_STALE_AFTER_S
            )
    return JobPage(
        progress=progress,
        settings=dict(settings),
        bucket_s=bucket_s,
        flow=FlowControls(**dict(flow)),
        throughput=throughput,
        errors=[dict(r) for r in errors],
        events=[dict(r) for r in events],
        live_worker=bool(live),
    )


def _fill_buckets(
    rows: list[dict[str, Any]], start: datetime, until: datetime, bucket_s: float
) -> list[dict[str, Any]]:
    """Every bucket from the job's start to its end (or now), empty ones included, so the
    chart's time axis is even."""
    if not rows:
        return []
    by_bucket = {r["bucket"]: r for r in rows}
    step = timedelta(seconds=bucket_s)
    filled = []
    at = start
    while at <= max(until, rows[-1]["bucket"]):
        row = by_bucket.get(at, {"bucket": at, "completed": 0, "failed": 0})
        filled.append(row)
        at += step
    return filled


async def chunk_map(pool: asyncpg.Pool, job_id: UUID) -> tuple[int, str]:
    """How many chunks job ``job_id`` has, and each one's state as a character, by seq
    (``present.STATES``)."""
    with database_errors():
        row = await pool.fetchrow(_sql()["web_chunk_map"], job_id)
    assert row is not None
    return int(row["chunks"]), str(row["states"])


@dataclass(frozen=True)
class ChunkDetail:
    chunk: dict[str, Any]
    events: list[dict[str, Any]]


async def chunk_detail(pool: asyncpg.Pool, job_id: UUID, seq: int) -> ChunkDetail | None:
    """One chunk (by position) and its audit trail; None when the job has no such chunk."""
    q = _sql()
    with database_errors():
        async with pool.acquire() as conn:
            chunk = await conn.fetchrow(q["web_chunk"], job_id, seq)
            if chunk is None:
                return None
            events = await conn.fetch(q["web_chunk_events"], job_id, seq)
    return ChunkDetail(chunk=dict(chunk), events=[dict(e) for e in events])


async def job_payload(pool: asyncpg.Pool, job_id: UUID) -> str | None:
    """The job's payload as the JSON text jsonb prints (decoded by the page, which can then
    tell a payload too deep for Python apart); None when there is no such job."""
    with database_errors():
        text: str | None = await pool.fetchval(_sql()["web_job_payload"], job_id)
    return text


async def chunk_payload(pool: asyncpg.Pool, job_id: UUID, seq: int) -> str | None:
    """The chunk's payload as JSON text; None when the job has no such chunk."""
    with database_errors():
        text: str | None = await pool.fetchval(_sql()["web_chunk_payload"], job_id, seq)
    return text


async def workers(pool: asyncpg.Pool, *, stale_after_s: float | None) -> list[dict[str, Any]]:
    """Registered daemons, each with ``live`` (a heartbeat within ``stale_after_s`` seconds;
    None: within three of its own heartbeats, as the reaper counts), the silence that makes
    it stale (``stale_after_s``) and ``in_flight`` (chunks it holds now)."""
    with database_errors():
        rows = await pool.fetch(_sql()["web_workers"], stale_after_s, LEGACY_STALE_AFTER_S)
    return [{**dict(r), "live": r["heartbeat_age_s"] <= r["stale_after_s"]} for r in rows]


async def queue_totals(pool: asyncpg.Pool) -> dict[str, int]:
    """Live chunks by status (``queue_depth()``: :data:`QUEUE_STATUSES`)."""
    with database_errors():
        rows = await pool.fetch(_sql()["web_queue_depth"])
    return {r["status"]: int(r["chunks"]) for r in rows}


@dataclass(frozen=True)
class QueueDepth:
    """Live chunks by status (``queue_depth()``), and by kind and status
    (``queue_depth_by_kind()``); the statuses are :data:`QUEUE_STATUSES`."""

    totals: dict[str, int]
    by_kind: dict[str, dict[str, int]]


async def queue_depth(pool: asyncpg.Pool) -> QueueDepth:
    q = _sql()
    with database_errors():
        async with pool.acquire() as conn:
            totals = await conn.fetch(q["web_queue_depth"])
            by_kind_rows = await conn.fetch(q["web_queue_depth_by_kind"])
    by_kind: dict[str, dict[str, int]] = {}
    for r in by_kind_rows:
        by_kind.setdefault(r["kind"], {})[r["status"]] = int(r["chunks"])
    return QueueDepth(totals={r["status"]: int(r["chunks"]) for r in totals}, by_kind=by_kind)
