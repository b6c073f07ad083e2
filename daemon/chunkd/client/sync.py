"""The Python client, blocking: :mod:`chunkd.client`'s functions, with the same names,
arguments and errors, for a psycopg 3 ``Connection`` (extra ``chunkd[psycopg]``).

A job is created inside the transaction ``conn`` is in: in a non-autocommit connection, or
inside ``with conn.transaction():``, it commits or rolls back with the caller's own writes; in
autocommit mode it is committed at once. A connection lost during a call raises
:class:`~chunkd.errors.ConnectionLostError`, as in :mod:`chunkd.client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeAlias
from uuid import UUID

from chunkd.client.common import (
    driver_of,
    is_closed,
    job_id,
    job_params,
    jobs_param,
    lost_connection,
    progress_document,
    translate_error,
    unsupported,
)
from chunkd.client.progress import Progress
from chunkd.db.sql_files import queries
from chunkd.errors import ConnectionLostError, InvalidInputError, JobNotFoundError

if TYPE_CHECKING:
    import psycopg

    Connection: TypeAlias = psycopg.Connection[Any]

__all__ = [
    "ConnectionLostError",
    "InvalidInputError",
    "JobNotFoundError",
    "Progress",
    "cancel",
    "create_sync_job",
    "create_sync_jobs",
    "get_progress",
    "retry_failed",
    "wait",
]

_EXPECTED = "a psycopg Connection (for asyncpg or psycopg's AsyncConnection: chunkd.client)"


def _fetch(conn: Connection, name: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Runs the named statement of ``sql/queries.sql`` on ``conn``; the rows as tuples."""
    sql = queries()[name]
    if driver_of(conn) == "psycopg":
        import psycopg
        from psycopg.rows import tuple_row

        if isinstance(conn, psycopg.Connection):
            was_open = not is_closed(conn)
            try:
                # Tuples whatever row factory the caller's connection has (dict_row, ...).
                with psycopg.RawCursor(conn, row_factory=tuple_row) as cursor:
                    cursor.execute(sql, args)
                    return cursor.fetchall()
            except Exception as exc:
                call = name.removeprefix("client_")
                error = lost_connection(exc, conn, call, was_open=was_open) or translate_error(exc)
                if error is None:
                    raise
                raise error from exc
    raise unsupported(conn, _EXPECTED)


def create_sync_job(
    conn: Connection,
    kind: str,
    chunks: Sequence[Any],
    *,
    payload: Any = None,
    max_concurrency: int | None = None,
    max_attempts: int = 3,
    priority: int = 0,
    run_at: datetime | None = None,
    dedupe_key: str | None = None,
    open: bool = False,
    on_finish_kind: str | None = None,
    max_per_second: float | Decimal | None = None,
    concurrency_key: str | None = None,
    traceparent: str | None = None,
    label: str | None = None,
) -> UUID:
    """Creates one sync job and returns its id (or that of the unfinished job holding
    ``dedupe_key``): :func:`chunkd.client.create_sync_job`, blocking. Same arguments (types,
    units, limits) and errors."""
    statement, args = job_params(
        kind, chunks, payload, max_concurrency, max_attempts, priority, run_at, dedupe_key,
        open, on_finish_kind, max_per_second, concurrency_key, traceparent, label,
    )  # fmt: skip
    ((job,),) = _fetch(conn, statement, args)
    return UUID(str(job))


def create_sync_jobs(conn: Connection, jobs: Iterable[Mapping[str, Any]]) -> list[UUID]:
    """Creates many sync jobs in one statement, all or none; their ids in input order:
    :func:`chunkd.client.create_sync_jobs`, blocking."""
    rows = _fetch(conn, "client_create_sync_jobs", (jobs_param(jobs),))
    return [UUID(str(row[0])) for row in rows]


def get_progress(conn: Connection, job: UUID | str) -> Progress:
    """The job's progress: :func:`chunkd.client.get_progress`, blocking.

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: ``job`` is not a UUID.
    """
    job = job_id(job)
    ((text,),) = _fetch(conn, "client_get_progress", (job,))
    return Progress.from_document(progress_document(text, job))


def wait(
    conn: Connection, job: UUID | str, timeout_s: float | None = None, *, poll_s: float = 0.5
) -> Progress:
    """Waits until the job has finished and returns its final progress:
    :func:`chunkd.client.wait`, blocking. Same arguments and errors (``TimeoutError`` after
    ``timeout_s`` seconds)."""
    if not poll_s > 0:
        raise InvalidInputError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        progress = get_progress(conn, job)
        if progress.finished:
            return progress
        left = poll_s if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"sync job {progress.sync_job_id} is still {progress.overall_status}"
            )
        time.sleep(min(poll_s, left))


def cancel(conn: Connection, job: UUID | str) -> int:
    """Cancels the job; how many chunks were cancelled: :func:`chunkd.client.cancel`,
    blocking.

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: ``job`` is not a UUID.
    """
    ((count,),) = _fetch(conn, "client_cancel", (job_id(job),))
    return int(count)


def retry_failed(conn: Connection, job: UUID | str) -> int:
    """Failed chunks back to pending, attempts reset; how many:
    :func:`chunkd.client.retry_failed`, blocking.

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: the job is cancelled, or its dedupe key is held by another
            unfinished job, or ``job`` is not a UUID.
    """
    ((count,),) = _fetch(conn, "client_retry_failed", (job_id(job),))
    return int(count)
