"""Delayed start (``run_at``): nothing is claimed before it, by the database clock; the job is
``scheduled`` until then; the daemons are told when it is due, counted from the commit."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from chunkd.db import connect
from daemon_helpers import wait_until
from enqueue_helpers import db_time, enqueue, overall_status
from sql_helpers import claim, make_due, status_counts


async def test_a_delayed_job_is_scheduled_and_never_claimed_before_run_at(conn) -> None:
    run_at = await db_time(conn, 1.0)
    job = await enqueue(conn, 3, run_at=run_at)
    assert await overall_status(conn, job) == "scheduled"
    assert await status_counts(conn, job) == {"pending": 3}
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["overall_status"] == "scheduled"
    assert progress["run_at"] is not None and progress["started_at"] is None
    queued = await conn.fetch(
        "SELECT run_at FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
    )
    assert [r["run_at"] for r in queued] == [run_at] * 3
    assert await claim(conn, "w", 10) == []

    async def claimed() -> list[asyncpg.Record]:
        return await claim(conn, "w", 10)

    rows = await wait_until(claimed, timeout_s=10, what="the delayed chunks to be claimable")
    assert len(rows) == 3
    starts = await conn.fetch(
        "SELECT a.claimed_at FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id"
        " WHERE j.public_id = $1",
        job,
    )
    assert len(starts) == 3 and all(s["claimed_at"] >= run_at for s in starts)
    assert await overall_status(conn, job) == "processing"


async def test_scheduled_turns_pending_when_run_at_passes_unclaimed(conn) -> None:
    job = await enqueue(conn, 2, run_at=await db_time(conn, 0.3))
    assert await overall_status(conn, job) == "scheduled"

    async def pending() -> bool:
        return await overall_status(conn, job) == "pending"

    await wait_until(pending, timeout_s=10, what="the job's run_at to pass")


async def test_run_at_now_in_the_past_or_null_is_due_at_once(conn) -> None:
    past = await enqueue(conn, 1, run_at=await db_time(conn, -3600))
    now = await enqueue(conn, 1, run_at=await db_time(conn))
    unset = await enqueue(conn, 1)
    for job in (past, now, unset):
        assert await overall_status(conn, job) == "pending"
    assert await conn.fetchval("SELECT count(*) FROM chunkd.scheduled") == 0
    assert len(await claim(conn, "w", 10)) == 3


async def test_a_scheduled_job_can_be_cancelled(conn) -> None:
    job = await enqueue(conn, 4, run_at=await db_time(conn, 3600))
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 4
    assert await overall_status(conn, job) == "cancelled"
    assert await status_counts(conn, job) == {"cancelled": 4}
    assert await conn.fetchval("SELECT count(*) FROM chunkd.scheduled") == 0


async def test_a_delayed_limited_job_runs_in_seq_order(conn) -> None:
    job = await enqueue(conn, 3, max_concurrency=1, run_at=await db_time(conn, 0.3))
    assert await claim(conn, "w", 5) == []

    async def first() -> list[asyncpg.Record]:
        return await claim(conn, "w", 5)

    (row,) = await wait_until(first, timeout_s=10, what="the delayed job's first chunk")
    assert (row["parent_sync_job_id"], row["seq"]) == (job, 0)


@pytest.mark.slow
async def test_a_100k_chunk_delayed_job_is_claimable_in_full_batches_once_due(conn) -> None:
    """promote_due moves at most 10,000 due chunks per claim: every claim still gets a full
    batch until all 100,000 are claimed, and the status counts them pending throughout."""
    total, batch = 100_000, 5_000
    run_at = await db_time(conn, 1.0)
    job = await enqueue(conn, total, run_at=run_at)  # takes about as long as the delay
    # Until run_at by the database clock (a known moment, not a guess).
    await conn.execute(
        "SELECT pg_sleep(greatest(0, extract(epoch FROM $1 - clock_timestamp())))", run_at
    )
    assert await conn.fetchval("SELECT count(*) FROM chunkd.scheduled") == total
    claimed = 0
    while claimed < total:
        rows = await claim(conn, "w", batch)
        assert len(rows) == batch, f"a short claim after {claimed} chunks"
        claimed += len(rows)
        pending = await conn.fetchval(
            "SELECT pending_chunks FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        )
        assert pending == total - claimed
    assert await claim(conn, "w", batch) == []


async def test_a_delayed_job_notifies_its_delay_counted_from_the_commit(database, conn) -> None:
    """The producer's transaction may run on after enqueueing: the wake-up the daemons get
    still counts from the commit, so their timer does not fire late by that much."""
    listener = await connect(database.dsn)
    received: asyncio.Queue[float] = asyncio.Queue()
    await listener.add_listener("chunkd", lambda *args: received.put_nowait(float(args[3])))
    try:
        async with conn.transaction():
            await enqueue(conn, 2, run_at=await db_time(conn, 30.0))
            await asyncio.sleep(1.5)  # the producer's own work, inside its transaction
            committed = time.monotonic()
        delays = [await asyncio.wait_for(received.get(), 5)]
        while len(delays) < 2:
            delays.append(await asyncio.wait_for(received.get(), 5))
        arrived = time.monotonic() - committed
        assert received.empty()
        # One from the scheduled rows (counted from their insert), one from the commit.
        assert max(delays) > 29.9
        assert 25.0 < min(delays) <= 30.0 - 1.5 + arrived + 0.01, delays
    finally:
        await listener.close()


async def test_an_immediate_job_sends_no_delayed_wakeup(database, conn) -> None:
    listener = await connect(database.dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("chunkd", lambda *args: received.put_nowait(args[3]))
    try:
        await enqueue(conn, 3)
        assert await asyncio.wait_for(received.get(), 5) == "0"
        await enqueue(conn, 1, run_at=await db_time(conn, -5))
        assert await asyncio.wait_for(received.get(), 5) == "0"
        # A marker statement: its notification comes after anything the enqueues sent.
        await conn.execute("SELECT pg_notify('chunkd', 'marker')")
        assert await asyncio.wait_for(received.get(), 5) == "marker"
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("run_at", "message"),
    [
        ("soon", 'invalid input syntax for type timestamp with time zone: "soon"'),
        (
            "infinity",
            "run_at must be a finite timestamp from 0001-01-01 to 9999-12-31 UTC (NULL: at once),"
            " got infinity",
        ),
    ],
)
async def test_a_run_at_that_is_not_a_time_is_refused_and_writes_nothing(
    conn, run_at: str, message: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as error:
        await conn.fetchval(
            "SELECT chunkd.create_sync_job('k', '[1]', run_at => $1::text::timestamptz)", run_at
        )
    assert message in str(error.value)
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


async def test_a_waiting_delayed_limited_job_keeps_claims_on_the_fast_path(conn) -> None:
    """claim_flow (the slow path) is for limited jobs that may have runnable chunks; one
    whose run_at lies ahead has none, and must not slow every claim of its kind until then."""
    calls = (
        "SELECT pg_stat_get_xact_function_calls("
        "'chunkd.claim_flow(text, int, text[], timestamptz, float8, int)'::regprocedure)"
    )
    async with conn.transaction():
        await conn.execute("SET LOCAL track_functions = 'all'")
        await enqueue(conn, 2)
        limited = await enqueue(conn, 2, max_concurrency=1, run_at=await db_time(conn, 3600))
        assert len(await claim(conn, "w", 10)) == 2
        assert await conn.fetchval(calls) is None, "no call of the slow path"
        # Its run_at comes: now the slow path serves it, one chunk at a time.
        await conn.execute("UPDATE chunkd.jobs SET run_at = now() WHERE public_id = $1", limited)
        await make_due(conn, limited)
        (row,) = await claim(conn, "w", 10)
        assert (row["parent_sync_job_id"], row["seq"]) == (limited, 0)
        assert await conn.fetchval(calls) == 1
