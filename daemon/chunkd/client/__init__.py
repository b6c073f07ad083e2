"""The Python client, async: create jobs, read their progress, cancel and retry them, on the
caller's own connection.

Every function takes ``conn``: an asyncpg ``Connection`` or ``Pool``, or a psycopg 3
``AsyncConnection`` (extra ``chunkd[psycopg]``). :mod:`chunkd.client.sync` has the same
functions, blocking, for a psycopg 3 ``Connection``.

**Transactional enqueue.** A job is created by one statement on ``conn``, so it belongs to the
transaction ``conn`` is in: inside ``async with conn.transaction():`` (either driver), or on a
psycopg connection not in autocommit mode (which opens a transaction with its first
statement), it commits or rolls back with the caller's own writes: a job is never created for
an order that was rolled back, and never lost for one that committed. Outside a transaction
(asyncpg, or psycopg in autocommit mode) it is committed at once; a pool runs it on a
connection of its own.

**Errors.** A value chunkd refuses raises :class:`~chunkd.errors.InvalidInputError` (a
``ValueError``) with the server's message; an unknown job
:class:`~chunkd.errors.JobNotFoundError` (a ``LookupError``); a database without the chunkd
schema, or with an older one, :class:`~chunkd.errors.SchemaVersionError`. Like any failed
statement, a refusal aborts the caller's open transaction. Connection, permission and
serialization errors are the driver's own, as the caller's retry logic expects; a connection
lost during a call (its backend terminated, a restart or failover, the network) is
:class:`~chunkd.errors.ConnectionLostError` (a ``ConnectionError``), whichever driver saw it
and however: whether the call took effect is unknown, so retry it on a new connection, with
the same ``dedupe_key`` for an enqueue (docs: the Python client, Retrying after a lost
connection).
"""

from __future__ import annotations

import asyncio
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
    import asyncpg
    import asyncpg.pool
    import psycopg

    AsyncConnection: TypeAlias = (
        asyncpg.Connection
        | asyncpg.Pool
        | asyncpg.pool.PoolConnectionProxy
        | psycopg.AsyncConnection[Any]
    )

__all__ = [
    "ConnectionLostError",
    "InvalidInputError",
    "JobNotFoundError",
    "Progress",
    "cancel",
    "create_sync_job",
    "create_sync_jobs",
    "fetch_statement",
    "get_progress",
    "retry_failed",
    "wait",
]

_EXPECTED = "an asyncpg Connection or Pool, or a psycopg AsyncConnection"


async def fetch_statement(
    conn: AsyncConnection, name: str, args: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """Runs the named statement of ``sql/queries.sql`` on ``conn`` (either driver; also used
    by :mod:`chunkd.testing`); the rows as tuples. A refusal chunkd names raises its
    exception (:func:`~chunkd.client.common.translate_error`), anything else the driver's."""
    sql = queries()[name]
    driver = driver_of(conn)
    was_open = not is_closed(conn)
    try:
        if driver == "asyncpg":
            records = await conn.fetch(sql, *args)  # type: ignore[union-attr]
            return [tuple(r) for r in records]
        if driver == "psycopg":
            import psycopg
            from psycopg.rows import tuple_row

            if isinstance(conn, psycopg.AsyncConnection):
                # Tuples whatever row factory the caller's connection has (dict_row, ...).
                async with psycopg.AsyncRawCursor(conn, row_factory=tuple_row) as cursor:
                    await cursor.execute(sql, args)
                    return await cursor.fetchall()
    except Exception as exc:
        call = name.removeprefix("client_")
        error = lost_connection(exc, conn, call, was_open=was_open) or translate_error(exc)
        if error is None:
            raise
        raise error from exc
    raise unsupported(conn, _EXPECTED)


async def create_sync_job(
    conn: AsyncConnection,
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
    """Creates one sync job and returns its id (``chunkd.create_sync_job``).

    Args:
        conn: the caller's connection (see the module docstring); the job joins its open
            transaction.
        kind: selects the handler, 1-200 characters.
        chunks: one JSON-serialisable payload per chunk, at least one; a chunk's ``seq`` is
            its index. At most 1,000,000 chunks and 16 MiB (as stored).
        payload: the job payload every chunk's handler receives (JSON; None: ``{}``), at most
            1 MiB.
        max_concurrency: chunks of this job running at once (1: strictly in ``seq`` order);
            None: unlimited.
        max_attempts: attempts per chunk before it fails for good, >= 1.
        priority: higher runs first.
        run_at: no chunk starts before this time (an aware datetime, compared with the
            database clock); None: at once. Until then the job's status is ``scheduled``.
        dedupe_key: while an unfinished job of this ``kind`` with this key exists, nothing is
            created and that job's id is returned; once it finished or was cancelled, the key
            is free again. 1-256 characters; None: no key.
        open: the job takes more chunks from ``append_chunks`` and never finishes before
            ``close_sync_job`` (``chunks`` may then be empty) (docs: Jobs that grow).
        on_finish_kind: when the job finishes, a one-chunk job of this kind is created whose
            payload carries the finished job's id, status and counts; None: none.
        max_per_second: the job's own rate limit, chunks per second across the fleet; None:
            none (docs: Flow control).
        concurrency_key: the key whose concurrency limit (``set_concurrency_limit``) this job
            shares with the other unfinished jobs of the key (e.g. a tenant); None: none.
        traceparent: the W3C trace context the job's chunk spans join (docs: Observability,
            Tracing); None: the current OpenTelemetry span's, if opentelemetry is installed
            and a span is current, else none.
        label: a short text to find the job by (the dashboard shows and searches it, and
            ``get_progress`` returns it), 1-200 characters; None: none. A labeled job is
            created through ``chunkd.create_jobs`` (the enqueue role of docs/security.md may
            call it), since ``create_sync_job`` takes no label.

    Returns:
        The job's id, or the id of the unfinished job holding ``dedupe_key``.

    Raises:
        InvalidInputError: a value chunkd refuses (e.g. ``chunks`` that is not a non-empty
            list, an empty ``dedupe_key``, a naive ``run_at``), with the server's message.
        SchemaVersionError: the database has no chunkd schema, or an older one.
        ConnectionLostError: the connection was lost during the call; the job may or may
            not exist: call again on a new connection with the same ``dedupe_key``.
        TypeError: ``conn`` is not a connection this module supports.
    """
    statement, args = job_params(
        kind, chunks, payload, max_concurrency, max_attempts, priority, run_at, dedupe_key,
        open, on_finish_kind, max_per_second, concurrency_key, traceparent, label,
    )  # fmt: skip
    ((job,),) = await fetch_statement(conn, statement, args)
    return UUID(str(job))


async def create_sync_jobs(conn: AsyncConnection, jobs: Iterable[Mapping[str, Any]]) -> list[UUID]:
    """Creates many sync jobs in one statement (``chunkd.create_sync_jobs``): all or none.

    Args:
        conn: the caller's connection; the jobs join its open transaction.
        jobs: one mapping per job whose keys are :func:`create_sync_job`'s argument names
            (``kind`` and ``chunks`` required; ``run_at`` an aware datetime); an unknown key is
            refused.

    Returns:
        The jobs' ids in input order (a job whose dedupe key is held by an unfinished job,
        or by an earlier job of the same call, gets that job's id).

    Raises:
        InvalidInputError: a job chunkd refuses; the message names it (``jobs[3]: ...``,
            counted from 0). Nothing is created.
        SchemaVersionError, ConnectionLostError, TypeError: as :func:`create_sync_job` (a
            retry after a lost connection is safe when every job has a ``dedupe_key``).
    """
    rows = await fetch_statement(conn, "client_create_sync_jobs", (jobs_param(jobs),))
    return [UUID(str(row[0])) for row in rows]


async def get_progress(conn: AsyncConnection, job: UUID | str) -> Progress:
    """The job's progress (``chunkd.get_sync_job_progress``).

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: ``job`` is not a UUID.
    """
    job = job_id(job)
    ((text,),) = await fetch_statement(conn, "client_get_progress", (job,))
    return Progress.from_document(progress_document(text, job))


async def wait(
    conn: AsyncConnection, job: UUID | str, timeout_s: float | None = None, *, poll_s: float = 0.5
) -> Progress:
    """Waits until the job has finished (``completed``, ``partial_failure`` or ``cancelled``)
    and returns its final progress; an open job finishes only once closed.

    Reads the job's progress every ``poll_s`` seconds (driver-agnostic: no LISTEN, which the
    caller's pooled or transaction-pooled connection may not allow). Call it outside a
    ``REPEATABLE READ`` transaction, which would see the same snapshot every time.

    Args:
        timeout_s: seconds to wait at most; None: as long as it takes.
        poll_s: seconds between two reads, > 0.

    Raises:
        TimeoutError: the job had not finished after ``timeout_s`` seconds.
        JobNotFoundError: no job has this id.
        InvalidInputError: ``job`` is not a UUID, or ``poll_s`` is not positive.
    """
    if not poll_s > 0:
        raise InvalidInputError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        progress = await get_progress(conn, job)
        if progress.finished:
            return progress
        left = poll_s if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"sync job {progress.sync_job_id} is still {progress.overall_status}"
            )
        await asyncio.sleep(min(poll_s, left))


async def cancel(conn: AsyncConnection, job: UUID | str) -> int:
    """Cancels the job (``chunkd.cancel_sync_job``): its pending and processing chunks become
    cancelled at once (a handler still running one may finish, but its outcome is refused),
    and its dedupe key is free again.

    Returns:
        How many chunks were cancelled (0: it had finished already).

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: ``job`` is not a UUID.
    """
    ((count,),) = await fetch_statement(conn, "client_cancel", (job_id(job),))
    return int(count)


async def retry_failed(conn: AsyncConnection, job: UUID | str) -> int:
    """Puts the job's failed chunks back to pending with their attempts reset
    (``chunkd.retry_failed_chunks``).

    Returns:
        How many chunks were retried.

    Raises:
        JobNotFoundError: no job has this id.
        InvalidInputError: the job is cancelled, or its dedupe key is held by another
            unfinished job, or ``job`` is not a UUID.
    """
    ((count,),) = await fetch_statement(conn, "client_retry_failed", (job_id(job),))
    return int(count)
