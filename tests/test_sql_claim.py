"""Claiming: exclusivity under concurrency, limits, order, fairness, priority, exclusions."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import asyncpg

from chunkd.db import connect
from sql_helpers import claim, complete, create_job, fail, make_due, postpone, status_counts


async def test_concurrent_batch_claims_take_every_chunk_exactly_once(database) -> None:
    conn = await connect(database.dsn)
    job = await create_job(conn, 2000)
    await conn.close()

    async def claimer(i: int) -> list[asyncpg.Record]:
        c = await connect(database.dsn)
        got: list[asyncpg.Record] = []
        try:
            while True:
                rows = await claim(c, f"w{i}", 37)
                if not rows:
                    return got
                got.extend(rows)
        finally:
            await c.close()

    results = await asyncio.gather(*(claimer(i) for i in range(8)))
    claimed = Counter(r["queue_id"] for rows in results for r in rows)
    assert len(claimed) == 2000
    assert set(claimed.values()) == {1}
    assert sum(1 for rows in results if rows) >= 2, "claims should have been spread over workers"
    conn = await connect(database.dsn)
    try:
        assert await status_counts(conn, job) == {"processing": 2000}
        rows = await conn.fetch(
            "SELECT worker_id, count(*) FROM chunkd.chunk_processing_queue GROUP BY 1"
        )
        by_worker = {r[0]: r[1] for r in rows}
        expected = {f"w{i}": len(rows) for i, rows in enumerate(results) if rows}
        assert by_worker == expected
    finally:
        await conn.close()


async def test_claim_sets_processing_state_and_returns_payloads(conn) -> None:
    job = await create_job(conn, [{"a": 1}, {"a": 2}], payload={"mailbox": "x"})
    rows = await claim(conn, "w1", 5, lease=timedelta(seconds=30))
    assert [r["seq"] for r in rows] == [0, 1]
    assert [r["payload"] for r in rows] == [{"a": 1}, {"a": 2}]
    assert all(r["job_payload"] == {"mailbox": "x"} for r in rows)
    assert all(r["parent_sync_job_id"] == job and r["attempt"] == 1 for r in rows)
    row = await conn.fetchrow(
        "SELECT status, attempts, worker_id, started_at IS NOT NULL AS started,"
        " lease_expires_at - now() AS lease_left"
        " FROM chunkd.chunk_processing_queue WHERE id = $1",
        rows[0]["queue_id"],
    )
    assert row["status"] == "processing" and row["attempts"] == 1 and row["worker_id"] == "w1"
    assert row["started"]
    assert timedelta(seconds=25) < row["lease_left"] <= timedelta(seconds=30)
    assert await claim(conn, "w2", 5) == []


async def test_max_concurrency_one_never_overlaps_and_runs_in_seq_order(database) -> None:
    conn = await connect(database.dsn)
    job = await create_job(conn, 40, max_concurrency=1)
    await conn.close()
    starts: list[int] = []
    overlap_seen: list[int] = []

    async def claimer(i: int) -> None:
        c = await connect(database.dsn)
        try:
            idle_rounds = 0
            while idle_rounds < 200:
                rows = await claim(c, f"w{i}", 4)
                if not rows:
                    idle_rounds += 1
                    remaining = await c.fetchval(
                        "SELECT count(*) FROM chunkd.chunk_processing_queue"
                        " WHERE parent_sync_job_id = $1 AND status <> 'completed'",
                        job,
                    )
                    if remaining == 0:
                        return
                    await asyncio.sleep(0.001)
                    continue
                assert len(rows) == 1, "a limited job must hand out one chunk at a time"
                row = rows[0]
                processing = await c.fetchval(
                    "SELECT count(*) FROM chunkd.chunk_processing_queue"
                    " WHERE parent_sync_job_id = $1 AND status = 'processing'",
                    job,
                )
                if processing != 1:
                    overlap_seen.append(processing)
                starts.append(row["seq"])
                await asyncio.sleep(0.002)
                assert await complete(c, row["queue_id"], f"w{i}", row["attempt"])
        finally:
            await c.close()

    await asyncio.gather(*(claimer(i) for i in range(8)))
    assert overlap_seen == []
    assert starts == list(range(40))


async def test_limited_job_waiting_retry_holds_back_later_chunks(conn) -> None:
    job = await create_job(conn, 3, max_concurrency=1)
    (first,) = await claim(conn, "w", 10)
    assert first["seq"] == 0
    assert await fail(conn, first["queue_id"], "w", 1, retry_in=timedelta(hours=1)) == "pending"
    assert await claim(conn, "w", 10) == [], "seq 1 must wait while seq 0 waits for its retry"
    # A chunk that failed for good does not block the rest.
    await make_due(conn, job)
    (again,) = await claim(conn, "w", 10)
    assert again["seq"] == 0 and again["attempt"] == 2
    assert await fail(conn, again["queue_id"], "w", 2, retryable=False) == "failed"
    (nxt,) = await claim(conn, "w", 10)
    assert nxt["seq"] == 1


async def test_max_concurrency_three_caps_in_flight(conn) -> None:
    job = await create_job(conn, 10, max_concurrency=3)
    rows = await claim(conn, "w", 10)
    assert [r["seq"] for r in rows] == [0, 1, 2]
    assert await claim(conn, "w", 10) == []
    assert await complete(conn, rows[1]["queue_id"], "w", 1)
    more = await claim(conn, "w", 10)
    assert [r["seq"] for r in more] == [3]
    assert (await status_counts(conn, job))["processing"] == 3


async def test_small_job_behind_huge_job_is_served_within_first_batches(conn) -> None:
    big = await create_job(conn, 2000)
    small = await create_job(conn, 10)
    served_small: list[int] = []
    for batch_no in range(3):
        rows = await claim(conn, "w", 10)
        served_small += [batch_no for r in rows if r["parent_sync_job_id"] == small]
    assert len(served_small) == 10, f"small job got {len(served_small)} of 10 in 3 batches"
    assert (await status_counts(conn, big))["pending"] >= 1980


async def test_a_job_arriving_behind_a_progressed_one_takes_turns_with_it(conn) -> None:
    """Fair turns: a job enqueued later is served in the current round, one chunk per turn
    beside the job already under way; neither goes ahead of the other for all its chunks."""
    big = await create_job(conn, 500)
    for _ in range(10):
        await claim(conn, "w", 20)
    small = await create_job(conn, 5)
    rows = await claim(conn, "w", 10)
    order = ["small" if r["parent_sync_job_id"] == small else "big" for r in rows]
    assert order == ["big", "small"] * 5  # within a turn, first come first served
    assert [r["seq"] for r in rows if r["parent_sync_job_id"] == small] == [0, 1, 2, 3, 4]
    assert [r["seq"] for r in rows if r["parent_sync_job_id"] == big] == list(range(200, 205))
    assert (await status_counts(conn, big))["pending"] == 295


async def test_higher_priority_first(conn) -> None:
    low = await create_job(conn, 5, priority=0)
    high = await create_job(conn, 5, priority=10)
    limited_high = await create_job(conn, 5, priority=5, max_concurrency=2)
    rows = await claim(conn, "w", 7)
    jobs = [r["parent_sync_job_id"] for r in rows]
    assert jobs[:5] == [high] * 5
    assert jobs[5:] == [limited_high] * 2
    assert low not in jobs


async def test_future_run_at_cancelled_and_other_kinds_are_not_claimed(conn) -> None:
    future = await create_job(conn, 2, kind="a")
    await postpone(conn, future, timedelta(hours=1))
    cancelled = await create_job(conn, 2, kind="a")
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", cancelled) == 2
    other = await create_job(conn, 2, kind="b")
    assert await claim(conn, "w", 10, kinds=["a"]) == []
    rows = await claim(conn, "w", 10, kinds=["b", "c"])
    assert {r["parent_sync_job_id"] for r in rows} == {other}


async def test_claim_rejects_bad_arguments(conn) -> None:
    for worker, batch in (("", 1), ("w", 0)):
        try:
            await claim(conn, worker, batch)
        except asyncpg.InvalidParameterValueError as exc:
            assert "chunkd:" in str(exc)
        else:
            raise AssertionError(f"claim({worker!r}, {batch}) should have been rejected")


async def test_claim_for_few_slots_skips_limited_jobs_without_a_free_slot(conn) -> None:
    """Version 1 offered a claim for n slots the n oldest limited jobs, full or not: a small
    job behind two busy max_concurrency = 1 jobs got nothing from a claim for one or two."""
    big = [await create_job(conn, 30, max_concurrency=1) for _ in range(2)]
    first = await claim(conn, "w", 4)
    assert sorted((r["parent_sync_job_id"], r["seq"]) for r in first) == sorted(
        (job, 0) for job in big
    )
    small = await create_job(conn, 3, max_concurrency=1)
    (row,) = await claim(conn, "w", 1)
    assert (row["parent_sync_job_id"], row["seq"]) == (small, 0)
    assert await claim(conn, "w", 2) == [], "every limited job is at its limit"


async def test_limited_jobs_take_turns_by_progress(conn) -> None:
    """With a slot at a time, limited jobs of equal priority rotate: the job whose next chunk
    has the lowest seq goes first, as unlimited jobs interleave by seq."""
    jobs = [await create_job(conn, 4, max_concurrency=1) for _ in range(3)]
    order = []
    for _ in range(12):
        (row,) = await claim(conn, "w", 1)
        order.append((jobs.index(row["parent_sync_job_id"]), row["seq"]))
        assert await complete(conn, row["queue_id"], "w", row["attempt"])
    assert order == [(j, seq) for seq in range(4) for j in range(3)]
