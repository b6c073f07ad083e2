"""Two faults of schema version 1 that storage v2 removes, each with the input that showed it.

1. Limited jobs blocked the head of the line: the claim looked at the oldest limited jobs with
   pending work whether or not they had a free slot, so a small ``max_concurrency = 1`` job
   enqueued behind two busy ones waited for them to finish while slots sat idle.
2. Durations were sent as calendar intervals: ``RetryLater(86400)`` became ``'1 day'``, which
   PostgreSQL adds in the session's TimeZone, so across a DST change it meant 23 or 25 hours.
   Every duration (lease, backoff, RetryLater, heartbeat) is now exact seconds.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import asyncpg

from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts

RECORD = "test=daemon_handlers:record"


async def test_small_limited_job_starts_at_once_beside_busy_limited_jobs(db, start) -> None:
    # The input, end to end: three busy limited jobs hold three of four slots. The
    # mechanism (a claim for n slots looked only at the n oldest limited jobs, full or not) is
    # pinned at the claim itself in test_sql_claim.py.
    big = [await create_job(db, [{"sleep_s": 1}] * 30, max_concurrency=1) for _ in range(3)]
    start("--handler", RECORD, "--concurrency", "4")

    async def all_big_running() -> bool:
        running = await db.fetchval(
            "SELECT count(DISTINCT parent_sync_job_id) FROM chunkd.chunk_processing_queue"
            " WHERE status = 'processing' AND parent_sync_job_id = ANY ($1)",
            big,
        )
        return running == 3

    await wait_until(all_big_running, timeout_s=15, what="the big jobs running")
    small = await create_job(db, [{"sleep_s": 0.05}] * 3, max_concurrency=1)

    async def small_done() -> bool:
        return await status_counts(db, small) == {"completed": 3}

    await wait_until(small_done, timeout_s=6, what="the small job, beside three busy ones")
    for job in big:
        counts = await status_counts(db, job)
        assert counts.get("pending", 0) > 20, "the big jobs were not drained first"
    rows = await db.fetch(
        "SELECT job_id, seq, started_at, ended_at FROM public.test_executions WHERE job_id = $1"
        " ORDER BY seq",
        small,
    )
    assert [r["seq"] for r in rows] == [0, 1, 2]
    assert all(a["ended_at"] <= b["started_at"] for a, b in itertools.pairwise(rows))


def _dst_ending_within_a_day() -> str:
    """A POSIX TZ rule (XST = UTC-5, XDT = UTC-4) whose DST period ends about six hours from
    now, whatever today's date: ``n`` rules count days from 0 = January 1st, local time."""
    end_local = datetime.now(UTC) - timedelta(hours=4) + timedelta(hours=6)
    if end_local.hour == 0:
        end_local += timedelta(hours=1)
    day = end_local.timetuple().tm_yday - 1
    return f"XST5XDT,0/0,{day}/{end_local.hour}"


async def test_a_day_is_86400_seconds_in_a_session_whose_timezone_changes_dst(
    db, database, start
) -> None:
    zone = _dst_ending_within_a_day()
    await db.execute(f"ALTER DATABASE \"{database.name}\" SET timezone = '{zone}'")
    check = await asyncpg.connect(database.dsn)
    try:
        # The input is real: in this session, "1 day" from now is not 86,400 seconds.
        day_s = await check.fetchval(
            "SELECT extract(epoch FROM (now() + interval '1 day') - now())::float8"
        )
        assert day_s == 90000.0, (zone, day_s)
    finally:
        await check.close()

    job = await create_job(db, [{"fail": "retry_later", "delay_s": 86400}], max_attempts=3)
    start("--handler", RECORD, "--lease", "1d")

    async def scheduled() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT extract(epoch FROM s.run_at - a.ended_at)::float8 AS retry_in_s,"
            "       extract(epoch FROM a.lease_expires_at - a.claimed_at)::float8 AS lease_s"
            " FROM chunkd.attempts a"
            " JOIN chunkd.scheduled s ON s.chunk_id = a.chunk_id"
            " JOIN chunkd.jobs j ON j.id = a.job_id"
            " WHERE j.public_id = $1 AND a.outcome = 'snoozed'",
            job,
        )

    row = await wait_until(scheduled, timeout_s=15, what="the retry to be scheduled")
    assert row["retry_in_s"] == 86400.0  # version 1: 90,000 (25 hours)
    assert row["lease_s"] == 86400.0
