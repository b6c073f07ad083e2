"""What the operator commands do to the database: enqueue, read progress, retry, cancel, reap,
purge, list workers.

Every function takes a connection from :func:`chunkd.db.connect` and runs named statements from
``sql/queries.sql``; writes go through the public SQL functions, so the checks that protect an
edge function calling ``create_sync_job`` over RPC protect the CLI too. Server errors become
:class:`~chunkd.errors.ChunkdError` with one readable line, because an operator typing a
command should never see a traceback.

The input parser lives here as well: it is the other half of ``enqueue``, and keeping it pure
(text in, list out) lets the tests pin every error message without a database.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.db import TRANSIENT_ERRORS, DatabaseError
from chunkd.errors import ChunkdError
from chunkd.sql_files import queries

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "MAX_INPUT_BYTES",
    "TERMINAL_STATUSES",
    "JobDetail",
    "JobRow",
    "WorkerRow",
    "cancel_job",
    "database_errors",
    "enqueue",
    "job_detail",
    "list_jobs",
    "list_workers",
    "parse_chunks",
    "parse_json_option",
    "purge_finished",
    "reap",
    "retry_failed",
]

# Far above what create_sync_job accepts (16 MiB of chunks as stored): reading more than this
# only to be refused by the server would waste memory and a round trip.
MAX_INPUT_BYTES = 64 * 1024 * 1024

TERMINAL_STATUSES = frozenset({"completed", "partial_failure", "cancelled"})

_SCHEMA_MISSING = {"3F000", "42P01", "42883"}  # invalid schema, undefined table / function


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turns a server error into one ChunkdError line.

    Our SQL functions raise messages that start with ``chunkd: `` and are written for users;
    the prefix is dropped because the CLI prints ``chunkd: error: `` itself. Anything else is
    shown by its first line only (a server error can carry a multi-line DETAIL/context).
    """
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        # Connection cut, server restarting, a conflict: an operator command just says so,
        # in one line (whether to run it again is the operator's call).
        message = (str(exc) or type(exc).__name__).splitlines()[0]
        raise ChunkdError(f"database unavailable, try again: {message}") from None
    except DatabaseError as exc:
        message = (str(exc) or type(exc).__name__).splitlines()[0]
        if message.startswith("chunkd: "):
            raise ChunkdError(message.removeprefix("chunkd: ")) from None
        if getattr(exc, "sqlstate", None) in _SCHEMA_MISSING:
            raise ChunkdError(
                f"the chunkd schema is missing or incomplete ({message}); run `chunkd migrate`"
            ) from None
        raise ChunkdError(f"database error: {message}") from None


# ---------------------------------------------------------------------------------------------
# Parsing enqueue input
# ---------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and jsonb) do not.
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _describe_json_error(exc: json.JSONDecodeError | ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
    return f"invalid JSON: {exc}"


def parse_chunks(data: bytes) -> list[Any]:
    """Chunk payloads from a JSON array or NDJSON (one payload per line), in order.

    Which format is decided by the text, not by a flag: if the whole input is one JSON value it
    must be an array (a single one-line value is also a one-line NDJSON file, so it is one
    chunk); otherwise every non-blank line must be one JSON value. Errors name the line (and
    column) as the user's editor counts them, so the first bad line can be found at once.
    """
    if len(data) > MAX_INPUT_BYTES:
        raise ChunkdError(
            f"input is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB; a job holds at most "
            "16 MiB of chunks: split it into several jobs"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ChunkdError(f"line {line}: input is not UTF-8 (byte offset {exc.start})") from None
    if not text.strip():
        raise ChunkdError("the input is empty: give a JSON array of chunk payloads or NDJSON")

    try:
        whole = _loads(text)
    except json.JSONDecodeError as exc:
        # "Extra data" after a complete first value: NDJSON (possibly of arrays).
        if text.lstrip().startswith("[") and not exc.msg.startswith("Extra data"):
            raise ChunkdError(_describe_json_error(exc)) from None
        return _parse_ndjson(text)
    except ValueError as exc:  # NaN / Infinity
        if text.lstrip().startswith("["):
            raise ChunkdError(_describe_json_error(exc)) from None
        return _parse_ndjson(text)

    if isinstance(whole, list):
        if not whole:
            raise ChunkdError("the input array is empty: a job needs at least one chunk")
        return _check_storable(whole)
    if len([line for line in text.splitlines() if line.strip()]) == 1:
        return _check_storable([whole])
    raise ChunkdError(
        f"the input is {_kind_of(whole)} spread over several lines, not a JSON array of chunk "
        "payloads; give a JSON array, or NDJSON with one payload per line"
    )


def _parse_ndjson(text: str) -> list[Any]:
    chunks: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            chunks.append(_loads(line))
        except json.JSONDecodeError as exc:
            raise ChunkdError(
                f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ChunkdError(f"line {number}: invalid JSON: {exc}") from None
    return _check_storable(chunks)


def _has_nul(value: Any) -> bool:
    # Iterative: the parser accepts nesting as deep as the recursion limit allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


def _check_storable(chunks: list[Any]) -> list[Any]:
    """Valid JSON that jsonb cannot store is caught here, with the chunk's position, rather
    than as the server's "unsupported Unicode escape sequence"."""
    for seq, chunk in enumerate(chunks):
        if _has_nul(chunk):
            raise ChunkdError(
                f"chunk {seq} (0-based) contains \\u0000, which PostgreSQL's jsonb cannot store"
            )
    return chunks


def parse_json_option(option: str, text: str) -> Any:
    """A JSON-valued option such as ``--payload``, with the column of the first mistake."""
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc}") from None
    if _has_nul(value):
        raise ChunkdError(f"{option} contains \\u0000, which PostgreSQL's jsonb cannot store")
    return value


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------


async def enqueue(
    conn: asyncpg.Connection,
    *,
    kind: str,
    chunks: list[Any],
    payload: Any,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
) -> UUID:
    """One job through ``create_sync_job``: job, chunks and queue rows in one transaction."""
    with database_errors():
        return await conn.fetchval(
            queries()["ops_create_sync_job"],
            kind,
            json.dumps(chunks, ensure_ascii=False, separators=(",", ":")),
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
            max_concurrency,
            max_attempts,
            priority,
        )


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
        }


async def list_jobs(conn: asyncpg.Connection, *, limit: int | None) -> tuple[list[JobRow], int]:
    """The newest ``limit`` jobs (None: all), newest first, and how many jobs exist.

    Two statements on purpose: the view aggregates the whole queue table unless it is filtered
    by job id, and an ``= ANY(ids)`` filter is pushed into its GROUP BY, so the table costs the
    shown jobs' chunks, not the whole history.
    """
    q = queries()
    with database_errors():
        id_rows = await conn.fetch(q["ops_recent_job_ids"], limit)
        if not id_rows:
            return [], 0
        total = id_rows[0]["total_jobs"]
        rows = await conn.fetch(q["ops_job_status_rows"], [r["id"] for r in id_rows])
    jobs = [_job_row(r) for r in rows]
    return jobs, total


def _job_row(record: Any) -> JobRow:
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
        """Why a job may not move: pending chunks and nobody alive to claim them."""
        if self.progress.get("pending_chunks") and not self.live_worker_for_kind:
            return f"no live worker handles kind {self.kind!r}"
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            **self.progress,
            "priority": self.priority,
            "max_concurrency": self.max_concurrency,
            "max_attempts": self.max_attempts,
            "live_worker_for_kind": self.live_worker_for_kind,
            "note": self.note,
            "recent_errors": self.recent_errors,
        }


async def job_detail(
    conn: asyncpg.Connection, job_id: UUID, *, stale_after_s: float, errors_limit: int = 10
) -> JobDetail:
    q = queries()
    with database_errors():
        progress = await conn.fetchval(q["ops_job_progress"], job_id)
        settings = await conn.fetchrow(q["ops_job_settings"], job_id)
        if progress is None or settings is None:
            raise ChunkdError(f"no sync job {job_id}")
        errors = await conn.fetch(q["ops_recent_errors"], job_id, errors_limit)
        live = await conn.fetchval(
            q["ops_live_worker_for_kind"], progress["kind"], timedelta(seconds=stale_after_s)
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
    )


async def retry_failed(conn: asyncpg.Connection, job_id: UUID) -> int:
    """Failed chunks back to pending with their attempts reset; how many."""
    with database_errors():
        return await conn.fetchval(queries()["ops_retry_failed_chunks"], job_id)


async def cancel_job(conn: asyncpg.Connection, job_id: UUID) -> int:
    """Pending and processing chunks to cancelled; how many."""
    with database_errors():
        return await conn.fetchval(queries()["ops_cancel_sync_job"], job_id)


async def reap(conn: asyncpg.Connection) -> int:
    """Chunks whose lease expired back to pending (or failed); how many."""
    with database_errors():
        return await conn.fetchval(queries()["cleanup_stuck_chunks"])


async def purge_finished(conn: asyncpg.Connection, older_than_s: float) -> int:
    """Jobs finished more than ``older_than_s`` ago, deleted with all their rows; how many."""
    with database_errors():
        return await conn.fetchval(
            queries()["ops_purge_finished_jobs"], timedelta(seconds=older_than_s)
        )


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    version: str
    kinds: list[str]
    concurrency: int
    started_at: datetime
    last_heartbeat_at: datetime
    heartbeat_age_s: float
    live: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "kinds": self.kinds,
            "concurrency": self.concurrency,
            "started_at": self.started_at.isoformat(),
            "last_heartbeat_at": self.last_heartbeat_at.isoformat(),
            "heartbeat_age_s": round(self.heartbeat_age_s, 1),
            "state": "live" if self.live else "stale",
        }


async def list_workers(conn: asyncpg.Connection, *, stale_after_s: float) -> list[WorkerRow]:
    """Registered daemons; ages come from the database clock, so a skewed client cannot make a
    live worker look stale."""
    with database_errors():
        rows = await conn.fetch(queries()["ops_workers"])
    return [
        WorkerRow(
            worker_id=r["worker_id"],
            host=r["host"],
            pid=r["pid"],
            version=r["version"],
            kinds=list(r["kinds"]),
            concurrency=r["concurrency"],
            started_at=r["started_at"],
            last_heartbeat_at=r["last_heartbeat_at"],
            heartbeat_age_s=float(r["heartbeat_age_s"]),
            live=float(r["heartbeat_age_s"]) <= stale_after_s,
        )
        for r in rows
    ]
