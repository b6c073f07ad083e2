"""Open jobs from the operator's side: append chunks, close, and wait for a job to finish."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.chunk import dumps_json
from chunkd.db.locks import DEFAULT_LOCK_WAIT_S
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.errors import database_errors, rows_of, run_locked

if TYPE_CHECKING:
    import asyncpg

__all__ = ["JOB_FINISHED_CHANNEL", "append", "close", "wait"]

#: The channel of ``NOTIFY chunkd_job_finished '<job id> <overall_status>'``.
JOB_FINISHED_CHANNEL = "chunkd_job_finished"

# A safety re-check while waiting, in case a notification is lost with the connection.
_RECHECK_S = 5.0


async def append(
    conn: asyncpg.Connection,
    job_id: UUID,
    chunks: list[Any],
    *,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> int:
    """Appends ``chunks`` to the open job ``job_id``; how many. ChunkdError when the job is
    closed, cancelled or unknown. Lock waits as every operator action
    (:func:`chunkd.ops.errors.run_locked`)."""
    count: int = await run_locked(
        conn,
        queries()["ops_append_chunks"],
        job_id,
        dumps_json(chunks, ensure_ascii=False),
        what=f"append to job {job_id}",
        wanted=rows_of("jobs"),
        wait_s=lock_wait_s,
    )
    return count


async def close(
    conn: asyncpg.Connection, job_id: UUID, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> bool:
    """Closes the open job ``job_id``: True if it was open, False if already closed."""
    closed: bool = await run_locked(
        conn,
        queries()["ops_close_sync_job"],
        job_id,
        what=f"close of job {job_id}",
        wanted=rows_of("jobs"),
        wait_s=lock_wait_s,
    )
    return closed


async def _state(conn: asyncpg.Connection, job_id: UUID) -> tuple[str, bool]:
    row = await conn.fetchrow(queries()["ops_job_state"], job_id)
    if row is None:
        raise ChunkdError(f"no sync job {job_id}")
    return str(row["overall_status"]), bool(row["finished"])


async def wait(conn: asyncpg.Connection, job_id: UUID, timeout_s: float | None) -> str | None:
    """Waits until the job finishes; returns its overall status (``completed``,
    ``partial_failure`` or ``cancelled``), or None when ``timeout_s`` seconds passed first.

    LISTENs on ``chunkd_job_finished`` before reading the job's state, so a job finishing in
    between is not missed; re-reads the state every few seconds as well (a notification is
    lost if the connection is). ChunkdError for an unknown job.
    """
    woken = asyncio.Event()
    prefix = f"{job_id} "

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if str(payload).startswith(prefix):
            woken.set()

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with database_errors(conn):
        await conn.add_listener(JOB_FINISHED_CHANNEL, on_notify)
        try:
            while True:
                woken.clear()
                status, finished = await _state(conn, job_id)
                if finished:
                    return status
                left = _RECHECK_S if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(woken.wait(), min(left, _RECHECK_S))
                except TimeoutError:
                    pass
        finally:
            await conn.remove_listener(JOB_FINISHED_CHANNEL, on_notify)
