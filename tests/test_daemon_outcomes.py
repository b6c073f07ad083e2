"""Every claimed chunk ends recorded or handed back: outcomes of ``chunkd run`` under faults.

Real ``chunkd run`` subprocesses on the test database. Each test is one input that once left a
chunk ``processing`` under a lease its own daemon kept renewing, or failed a result that could
have been stored: a handler's own ``CancelledError``, a read-only database, a lock timeout,
error text PostgreSQL cannot store.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from chunkd.db import connect
from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts

FAST = ["--retry-base", "50ms", "--retry-cap", "100ms", "--reap-interval", "300ms"]


async def _terminal(conn: asyncpg.Connection, job) -> bool:
    counts = await status_counts(conn, job)
    return not counts.get("pending") and not counts.get("processing")


async def _rows(conn: asyncpg.Connection, job) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT seq, status, attempts, error_message FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1 ORDER BY seq",
        job,
    )


def _no_crash(daemon) -> None:
    events = [e["event"] for e in daemon.events()]
    assert "task.crashed" not in events and "chunk.abandoned" not in events, events
    assert not daemon.crash_lines()  # a handler's traceback rides on its outcome line


@pytest.mark.parametrize("handler", ["raises_cancelled", "cancels_inner_task"])
async def test_a_handlers_own_cancelled_error_is_its_chunks_failure(conn, start, handler) -> None:
    job = await create_job(conn, 2, max_attempts=2)
    daemon = start("--handler", f"test=fault_handlers:{handler}", "--lease", "2s", *FAST)
    await wait_until(lambda: _terminal(conn, job), timeout_s=20, what="both chunks to end")
    for row in await _rows(conn, job):
        assert (row["status"], row["attempts"]) == ("failed", 2), dict(row)
        assert row["error_message"] == "CancelledError", dict(row)
    # Failed by its outcome, not returned by the reaper after a lease ran out.
    reaped = await conn.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE sync_job_id = $1 AND event = 'reaped'",
        job,
    )
    assert reaped == 0
    assert daemon.process.poll() is None
    _no_crash(daemon)
    assert await daemon.stop() == 0


async def test_error_text_that_cannot_be_stored_is_stored_escaped(conn, start) -> None:
    jobs = {
        kind: await create_job(conn, 1, kind=kind, max_attempts=1)
        for kind in ("surrogate_error", "str_raises")
    }
    daemon = start(
        *[a for kind in jobs for a in ("--handler", f"{kind}=fault_handlers:{kind}")], *FAST
    )
    for kind, job in jobs.items():
        await wait_until(lambda job=job: _terminal(conn, job), timeout_s=20, what=kind)
    errors = {kind: (await _rows(conn, job))[0] for kind, job in jobs.items()}
    assert {r["status"] for r in errors.values()} == {"failed"}
    assert {r["attempts"] for r in errors.values()} == {1}
    # The handler's own error, escaped, rather than "lease expired".
    assert (
        errors["surrogate_error"]["error_message"]
        == "RuntimeError: bad byte \\ud800 and NUL \\x00 here"
    )
    assert (
        errors["str_raises"]["error_message"]
        == "_Unprintable: <str() of this exception raised ValueError>"
    )
    _no_crash(daemon)
    assert await daemon.stop() == 0


async def test_a_retry_delay_the_database_refuses_still_retries(conn, start) -> None:
    job = await create_job(conn, 1, max_attempts=2)
    daemon = start("--handler", "test=fault_handlers:retry_later_nan", *FAST)
    await wait_until(lambda: _terminal(conn, job), timeout_s=20, what="both attempts")
    (row,) = await _rows(conn, job)
    # The report was sent again with the default backoff: retried, then failed on attempt 2.
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["error_message"] == "RetryLater: come back at NaN"
    _no_crash(daemon)
    assert await daemon.stop() == 0


async def test_a_retry_due_after_9999_still_retries(conn, start) -> None:
    """RetryLater(3e11): its due time is refused as a data error (chunkd stores no time past
    9999), so the report goes again with the default backoff, as for a NaN delay; it was
    stored 9,500 years ahead (a time no reader could read)."""
    job = await create_job(conn, 1, max_attempts=2)
    daemon = start("--handler", "test=fault_handlers:retry_later_far", *FAST)
    await wait_until(lambda: _terminal(conn, job), timeout_s=20, what="both attempts")
    (row,) = await _rows(conn, job)
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["error_message"] == "RetryLater: come back in 9,500 years"
    _no_crash(daemon)
    assert await daemon.stop() == 0


async def _set_read_only(admin: asyncpg.Connection, on: bool) -> None:
    if on:
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await admin.execute("SELECT pg_reload_conf()")


async def test_a_read_only_window_loses_no_outcome_and_logs_one_line(conn, database, start) -> None:
    job = await create_job(conn, [{"sleep_s": 0.3}] * 60)
    daemon = start(
        "--handler", "test=bad_handlers:slow_echo", "--concurrency", "10", "--lease", "10s",
        "--poll-interval", "1s",
    )  # fmt: skip

    async def some_completed() -> bool:
        return (await status_counts(conn, job)).get("completed", 0) >= 10

    await wait_until(some_completed, timeout_s=20, what="the first completions")
    admin = await connect(database.server.admin_dsn)
    try:
        await admin.execute("SET default_transaction_read_only = off")  # this session writes
        await _set_read_only(admin, True)
        try:
            # The input: 3 s during which every write fails with SQLSTATE 25006 while handlers
            # keep finishing (10 at a time, 0.3 s each).
            await asyncio.sleep(3)
        finally:
            await _set_read_only(admin, False)
    finally:
        await admin.close()
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="all 60 chunks")
    rows = await _rows(conn, job)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}, [
        dict(r) for r in rows if r["status"] != "completed" or r["attempts"] != 1
    ]
    events = daemon.events()
    unwritable = [e for e in events if e["event"] == "database.unwritable"]
    assert len(unwritable) == 1, unwritable
    assert unwritable[0]["sqlstate"] == "25006" and "read-only" in unwritable[0]["reason"]
    assert len([e for e in events if e["event"] == "database.writable"]) == 1
    completed = [e for e in events if e["event"] == "chunk.completed"]
    assert len(completed) == 60
    _no_crash(daemon)
    assert await daemon.stop() == 0
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0


async def test_a_lock_timeout_on_completion_is_retried_not_a_failure(conn, database, start) -> None:
    # Every new session of this database gives up on a lock after 1 s.
    await conn.execute(f"ALTER DATABASE \"{database.name}\" SET lock_timeout = '1s'")
    job = await create_job(conn, [{"sleep_s": 0.5}] * 3)
    daemon = start("--handler", "test=bad_handlers:slow_echo", "--lease", "10s")

    async def claimed() -> bool:
        return (await status_counts(conn, job)).get("processing") == 3

    await wait_until(claimed, timeout_s=20, what="the 3 chunks to be claimed")
    async with conn.transaction():
        # The completion updates chunkd.attempts, then the job's counters in chunkd.jobs:
        # held here for 3 s, it times out (55P03) at least twice.
        await conn.execute("LOCK TABLE chunkd.jobs IN SHARE MODE")
        await asyncio.sleep(3)
    await wait_until(lambda: _terminal(conn, job), timeout_s=20, what="the 3 chunks")
    rows = await _rows(conn, job)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}, [
        dict(r) for r in rows
    ]
    timeouts = [
        e
        for e in daemon.events()
        if e["event"] == "complete.failed" and "lock timeout" in e["error"]
    ]
    assert timeouts, "the completion did meet the lock"
    _no_crash(daemon)
    assert await daemon.stop() == 0
