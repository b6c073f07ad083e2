"""Fencing, retries with backoff, the reaper, release, cancel, retry-failed, purge, audit."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sql_helpers import (
    claim,
    complete,
    create_job,
    expire_leases,
    fail,
    make_due,
    queue_row,
    status_counts,
)


async def test_fencing_rejects_stale_attempt_and_other_worker(conn) -> None:
    await create_job(conn, 1)
    (row,) = await claim(conn, "w1", 1)
    qid = row["queue_id"]
    before = await queue_row(conn, qid)
    assert await complete(conn, qid, "w2", 1) is False
    assert await complete(conn, qid, "w1", 2) is False
    assert await fail(conn, qid, "w2", 1) is None
    assert await fail(conn, qid, "w1", 7) is None
    assert await conn.fetchval("SELECT chunkd.heartbeat_chunks('w2', $1, '1 hour')", [qid]) == 0
    assert await conn.fetchval("SELECT chunkd.release_chunks('w2', $1)", [qid]) == 0
    after = await queue_row(conn, qid)
    assert dict(after) == dict(before), "a fenced-out call must change nothing"
    assert await complete(conn, qid, "w1", 1, {"ok": True}) is True
    done = await queue_row(conn, qid)
    assert done["status"] == "completed" and done["result"] == {"ok": True}
    assert await complete(conn, qid, "w1", 1) is False, "a second completion is rejected"


async def test_reaped_and_reclaimed_chunk_rejects_old_workers_completion(conn) -> None:
    await create_job(conn, 1)
    (old,) = await claim(conn, "dead", 1)
    await expire_leases(conn)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
    (new,) = await claim(conn, "alive", 1)
    assert new["queue_id"] == old["queue_id"] and new["attempt"] == 2
    assert await complete(conn, old["queue_id"], "dead", 1) is False
    assert await fail(conn, old["queue_id"], "dead", 1) is None
    row = await queue_row(conn, new["queue_id"])
    assert row["status"] == "processing" and row["worker_id"] == "alive"
    assert await complete(conn, new["queue_id"], "alive", 2) is True


async def test_retry_backoff_grows_exponentially_within_jitter_and_cap(conn) -> None:
    await create_job(conn, 1, max_attempts=8)
    base, cap = timedelta(seconds=10), timedelta(seconds=100)
    delays: list[float] = []
    for attempt in range(1, 8):
        await make_due(conn)
        (row,) = await claim(conn, "w", 1)
        assert row["attempt"] == attempt
        assert await fail(
            conn, row["queue_id"], "w", attempt, f"e{attempt}", base=base, cap=cap
        ) == ("pending")
        delay = await conn.fetchval(
            "SELECT extract(epoch FROM run_at - now())::float FROM chunkd.chunk_processing_queue"
        )
        delays.append(delay)
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(100.0, 10.0 * 2 ** (attempt - 1))
        assert nominal / 2 - 0.01 <= delay <= nominal + 0.01, (attempt, delay)
    assert delays[2] > delays[0], "the delay must grow"
    assert max(delays) <= 100.01, "the cap must hold"


async def test_out_of_attempts_fails_with_error_and_permanent_fails_at_once(conn) -> None:
    job = await create_job(conn, 2, max_attempts=2)
    for attempt in (1, 2):
        await make_due(conn)
        rows = await claim(conn, "w", 1)
        status = await fail(conn, rows[0]["queue_id"], "w", attempt, f"boom {attempt}")
        assert status == ("pending" if attempt == 1 else "failed")
    failed = await conn.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_queue WHERE status = 'failed'"
    )
    assert failed["error_message"] == "boom 2" and failed["attempts"] == 2
    assert failed["completed_at"] is not None
    (other,) = await claim(conn, "w", 1)
    assert await fail(conn, other["queue_id"], "w", 1, "bad input", retryable=False) == "failed"
    assert await status_counts(conn, job) == {"failed": 2}


async def test_retry_in_overrides_backoff(conn) -> None:
    await create_job(conn, 1)
    (row,) = await claim(conn, "w", 1)
    await fail(conn, row["queue_id"], "w", 1, retry_in=timedelta(seconds=42))
    delay = await conn.fetchval(
        "SELECT extract(epoch FROM run_at - now())::float FROM chunkd.chunk_processing_queue"
    )
    assert 41.9 <= delay <= 42.0


async def test_cleanup_reaps_only_expired_leases(conn) -> None:
    job = await create_job(conn, 3, max_attempts=1)
    rows = await claim(conn, "w", 3, lease=timedelta(minutes=5))
    expired, renewed, live = (r["queue_id"] for r in rows)
    await expire_leases(conn, queue_ids=[expired, renewed])
    assert (
        await conn.fetchval("SELECT chunkd.heartbeat_chunks('w', $1, '1 minute')", [renewed]) == 1
    )
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
    states = {
        r["id"]: (r["status"], r["error_message"])
        for r in await conn.fetch("SELECT * FROM chunkd.chunk_processing_queue")
    }
    # max_attempts = 1: the reaped chunk is out of attempts, so it fails with "lease expired".
    assert states[expired] == ("failed", "lease expired")
    assert states[renewed] == ("processing", None)
    assert states[live] == ("processing", None)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 0
    assert (await status_counts(conn, job))["failed"] == 1


async def test_cleanup_returns_chunks_with_attempts_left_to_pending(conn) -> None:
    await create_job(conn, 2, max_attempts=3)
    await claim(conn, "w", 2)
    await expire_leases(conn)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 2
    rows = await conn.fetch(
        "SELECT status, attempts, run_at <= now() AS due FROM chunkd.chunk_processing_queue"
    )
    assert all(r["status"] == "pending" and r["attempts"] == 1 and r["due"] for r in rows)


async def test_release_returns_chunks_without_spending_the_attempt(conn) -> None:
    await create_job(conn, 2)
    rows = await claim(conn, "w", 2)
    assert (
        await conn.fetchval("SELECT chunkd.release_chunks('w', $1)", [r["queue_id"] for r in rows])
        == 2
    )
    states = await conn.fetch(
        "SELECT status, attempts, worker_id FROM chunkd.chunk_processing_queue"
    )
    assert all(s["status"] == "pending" and s["attempts"] == 0 for s in states)
    again = await claim(conn, "w2", 2)
    assert [r["attempt"] for r in again] == [1, 1]


async def test_cancelled_job_is_terminal_and_fences_in_flight_chunks(conn) -> None:
    job = await create_job(conn, 4)
    (row,) = await claim(conn, "w", 1)
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 4
    assert await claim(conn, "w", 10) == []
    assert await complete(conn, row["queue_id"], "w", 1) is False
    assert await status_counts(conn, job) == {"cancelled": 4}
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 0
    with pytest.raises(Exception, match="is cancelled"):
        await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job)


async def test_retry_failed_chunks_brings_failed_back_with_fresh_attempts(conn) -> None:
    job = await create_job(conn, 3, max_attempts=1)
    rows = await claim(conn, "w", 3)
    await complete(conn, rows[0]["queue_id"], "w", 1)
    await fail(conn, rows[1]["queue_id"], "w", 1)
    await fail(conn, rows[2]["queue_id"], "w", 1, retryable=False)
    assert await status_counts(conn, job) == {"completed": 1, "failed": 2}
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 2
    again = await claim(conn, "w", 3)
    assert sorted(r["seq"] for r in again) == [1, 2]
    assert all(r["attempt"] == 1 for r in again)


async def test_purge_removes_only_finished_jobs_older_than_cutoff(conn) -> None:
    old_done = await create_job(conn, 2)
    rows = await claim(conn, "w", 2)
    for r in rows:
        await complete(conn, r["queue_id"], "w", 1)
    recent_done = await create_job(conn, 1)
    (r,) = await claim(conn, "w", 1)
    await complete(conn, r["queue_id"], "w", 1)
    unfinished = await create_job(conn, 1)
    await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()")  # stamps finished_at
    await conn.execute(
        "UPDATE chunkd.jobs SET finished_at = now() - interval '8 days' WHERE public_id = $1",
        old_done,
    )
    await conn.execute(
        "UPDATE chunkd.jobs SET created_at = now() - interval '30 days' WHERE public_id = $1",
        unfinished,
    )
    assert await conn.fetchval("SELECT chunkd.purge_finished_jobs('7 days')") == 1
    remaining = {r[0] for r in await conn.fetch("SELECT id FROM chunkd.sync_jobs")}
    assert remaining == {recent_done, unfinished}
    for table, column in (
        ("chunk_processing_queue", "parent_sync_job_id"),
        ("chunked_sync_jobs", "sync_job_id"),
        ("chunk_events", "sync_job_id"),
    ):
        left = await conn.fetchval(
            f"SELECT count(*) FROM chunkd.{table} WHERE {column} = $1",  # noqa: S608 - fixed names
            old_done,
        )
        assert left == 0, table


async def test_audit_has_one_row_per_transition_with_worker_and_attempt(conn) -> None:
    job = await create_job(conn, 1, max_attempts=3)
    (r1,) = await claim(conn, "w1", 1)
    await fail(conn, r1["queue_id"], "w1", 1, "first", retry_in=timedelta(0))
    (_r2,) = await claim(conn, "w2", 1)
    await expire_leases(conn)
    await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()")
    (r3,) = await claim(conn, "w3", 1)
    await conn.fetchval("SELECT chunkd.release_chunks('w3', $1)", [r3["queue_id"]])
    (r4,) = await claim(conn, "w4", 1)
    assert await complete(conn, r4["queue_id"], "w4", r4["attempt"])
    events = [
        (e["event"], e["status"], e["attempt"], e["worker_id"], e["error"])
        for e in await conn.fetch(
            "SELECT * FROM chunkd.chunk_events WHERE sync_job_id = $1 ORDER BY at", job
        )
    ]
    assert events == [
        ("enqueued", "pending", 0, None, None),
        ("claimed", "processing", 1, "w1", None),
        ("retry_scheduled", "pending", 1, "w1", "first"),
        ("claimed", "processing", 2, "w2", None),
        ("reaped", "pending", 2, "w2", "lease expired"),
        ("claimed", "processing", 3, "w3", None),
        ("released", "pending", 2, "w3", None),
        ("claimed", "processing", 3, "w4", None),
        ("completed", "completed", 3, "w4", None),
    ]


async def test_failed_then_retried_then_cancelled_chunk_reads_cancelled(conn) -> None:
    """Found by the dashboard's chunk map: the last attempt of such a chunk failed for good,
    but a cancel took it from the queue after the operator's retry."""
    job = await create_job(conn, 1, max_attempts=1)
    (row,) = await claim(conn, "w", 1)
    assert await fail(conn, row["queue_id"], "w", 1, "broken", retryable=False) == "failed"
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 1
    assert await status_counts(conn, job) == {"cancelled": 1}
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["cancelled_chunks"] == 1 and progress["failed_chunks"] == 0
