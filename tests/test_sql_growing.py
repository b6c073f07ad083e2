"""Jobs that grow (schema version 3) at the SQL contract: continuations fenced with their
completion, open jobs, and the job_finished event exactly once (audit row, NOTIFY, on_finish
follow-up job), also when the last two chunks complete at the same moment."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from chunkd.db import DatabaseError
from sql_helpers import claim, complete, create_job, expire_leases, fail


async def _append_with(
    conn: asyncpg.Connection, queue_id: UUID, worker: str, attempt: int, chunks: list[Any]
) -> int | None:
    return await conn.fetchval(
        "SELECT chunkd.complete_chunk_and_append($1, $2, $3, $4::jsonb, $5::jsonb)",
        queue_id, worker, attempt, json.dumps({"page": "done"}), json.dumps(chunks),
    )  # fmt: skip


async def _job(conn: asyncpg.Connection, job: UUID) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job)


async def _seqs(conn: asyncpg.Connection, job: UUID) -> list[tuple[int, Any]]:
    rows = await conn.fetch(
        "SELECT seq, payload FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1 ORDER BY seq",
        job,
    )
    return [(r["seq"], r["payload"]) for r in rows]


async def _finished_events(conn: asyncpg.Connection, job: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM chunkd.job_events WHERE sync_job_id = $1 AND event = 'job_finished'", job
    )


async def test_a_completion_appends_chunks_at_the_next_seq_values(conn) -> None:
    job = await create_job(conn, [{"page": 0}], max_concurrency=1)
    (row,) = await claim(conn, "w")
    appended = await _append_with(conn, row["queue_id"], "w", 1, [{"page": 1}, {"page": 2}])
    assert appended == 2
    assert await _seqs(conn, job) == [(0, {"page": 0}), (1, {"page": 1}), (2, {"page": 2})]
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert (progress["total_chunks"], progress["completed_chunks"]) == (3, 1)
    assert (progress["pending_chunks"], progress["overall_status"]) == (2, "processing")
    # Any running chunk may append more: the total is not final until the job finishes.
    assert (progress["total_is_final"], progress["appended_chunks"]) == (False, 2)
    # max_concurrency = 1 runs them in seq order.
    (nxt,) = await claim(conn, "w", 5)
    assert nxt["seq"] == 1
    assert await _append_with(conn, nxt["queue_id"], "w", 1, []) == 0
    (last,) = await claim(conn, "w", 5)
    assert await complete(conn, last["queue_id"], "w", 1)
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert (progress["overall_status"], progress["total_is_final"]) == ("completed", True)
    assert len(await _finished_events(conn, job)) == 1


async def test_a_stale_completion_appends_nothing(conn) -> None:
    job = await create_job(conn, [{"page": 0}])
    (row,) = await claim(conn, "old")
    # The old worker's lease expires; the chunk is reaped and claimed again by another.
    await expire_leases(conn, job)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
    (again,) = await claim(conn, "new")
    assert again["attempt"] == 2
    # The old worker finally reports, with the next page: fenced out, nothing appended.
    assert await _append_with(conn, row["queue_id"], "old", 1, [{"page": 1}]) is None
    assert await _seqs(conn, job) == [(0, {"page": 0})]
    assert (await _job(conn, job))["total_chunks"] == 1
    # The holder's continuation is the one that counts, once.
    assert await _append_with(conn, again["queue_id"], "new", 2, [{"page": 1}]) == 1
    assert await _append_with(conn, again["queue_id"], "new", 2, [{"page": 1}]) is None
    assert await _seqs(conn, job) == [(0, {"page": 0}), (1, {"page": 1})]


async def test_a_cancelled_chunk_appends_nothing_and_limits_hold(conn) -> None:
    job = await create_job(conn, 1)
    (row,) = await claim(conn, "w")
    with pytest.raises(DatabaseError, match="chunks must be a JSON array"):
        await conn.fetchval(
            "SELECT chunkd.complete_chunk_and_append($1, 'w', 1, NULL, '{\"a\": 1}')",
            row["queue_id"],
        )
    # The refused call changed nothing: the attempt is still open and can complete.
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 1
    assert await _append_with(conn, row["queue_id"], "w", 1, [{"late": True}]) is None
    assert (await _job(conn, job))["total_chunks"] == 1
    # At most 1,000,000 chunks per job, appends included.
    big = await create_job(conn, 1)
    (row,) = await claim(conn, "w")
    await conn.execute(
        "UPDATE chunkd.jobs SET total_chunks = 999999 WHERE public_id = $1", big
    )  # as if it held that many already
    with pytest.raises(DatabaseError, match="above the limit of 1,000,000"):
        await _append_with(conn, row["queue_id"], "w", 1, [{}, {}])


async def test_open_job_takes_appends_and_finishes_only_when_closed(conn) -> None:
    job = await conn.fetchval(
        "SELECT chunkd.create_sync_job('feed', '[]'::jsonb, open => true)"
    )  # an open job may start empty
    assert (await _job(conn, job))["total_chunks"] == 0
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert (progress["open"], progress["total_is_final"], progress["progress_percentage"]) == (
        True, False, 0,
    )  # fmt: skip
    assert await conn.fetchval("SELECT chunkd.append_chunks($1, '[{\"n\": 0}]')", job) == 1
    (row,) = await claim(conn, "w")
    assert await complete(conn, row["queue_id"], "w", 1)
    # Every chunk is terminal, but the job is open: not finished, no event.
    assert (await _job(conn, job))["finished_at"] is None
    assert await _finished_events(conn, job) == []
    assert await conn.fetchval("SELECT chunkd.append_chunks($1, '[{\"n\": 1}, {}]')", job) == 2
    assert await _seqs(conn, job) == [(0, {"n": 0}), (1, {"n": 1}), (2, {})]
    for row in await claim(conn, "w", 5):
        assert await complete(conn, row["queue_id"], "w", 1)
    seen: list[str] = []
    await conn.add_listener("chunkd_job_finished", lambda *a: seen.append(a[3]))
    assert await conn.fetchval("SELECT chunkd.close_sync_job($1)", job) is True
    assert await conn.fetchval("SELECT chunkd.close_sync_job($1)", job) is False  # idempotent
    (event,) = await _finished_events(conn, job)
    assert event["status"] == "completed"
    assert event["detail"]["total_chunks"] == 3 and event["detail"]["completed_chunks"] == 3
    await conn.execute("SELECT 1")  # notifications arrive between statements
    assert seen == [f"{job} completed"]
    with pytest.raises(DatabaseError, match="is closed"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '[{}]')", job)


async def test_closing_with_work_left_finishes_with_the_last_chunk(conn) -> None:
    job = await conn.fetchval(
        "SELECT chunkd.create_sync_job('feed', '[{}, {}]'::jsonb, open => true)"
    )
    first, second = await claim(conn, "w", 2)
    assert await complete(conn, first["queue_id"], "w", 1)
    assert await conn.fetchval("SELECT chunkd.close_sync_job($1)", job) is True
    assert (await _job(conn, job))["finished_at"] is None
    assert await fail(conn, second["queue_id"], "w", 1, retryable=False) == "failed"
    (event,) = await _finished_events(conn, job)
    assert event["status"] == "partial_failure"
    assert (await _job(conn, job))["finished_at"] is not None


async def test_append_errors_are_clear(conn) -> None:
    unknown = UUID(int=7)
    with pytest.raises(DatabaseError, match=f"no sync job {unknown}"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '[{}]')", unknown)
    with pytest.raises(DatabaseError, match=f"no sync job {unknown}"):
        await conn.fetchval("SELECT chunkd.close_sync_job($1)", unknown)
    closed = await create_job(conn, 1)  # not created open: closed from the start
    with pytest.raises(DatabaseError, match="closed \\(or was not created open\\)"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '[{}]')", closed)
    feed = await conn.fetchval("SELECT chunkd.create_sync_job('feed', '[]'::jsonb, open => true)")
    with pytest.raises(DatabaseError, match="must not be empty"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '[]')", feed)
    with pytest.raises(DatabaseError, match="must be a JSON array"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '{}')", feed)
    # Cancelling an open job closes and finishes it, with one event, even with no chunk.
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", feed) == 0
    (event,) = await _finished_events(conn, feed)
    assert event["status"] == "cancelled"
    with pytest.raises(DatabaseError, match="is cancelled"):
        await conn.fetchval("SELECT chunkd.append_chunks($1, '[{}]')", feed)
    with pytest.raises(DatabaseError, match="chunks must not be empty"):
        await create_job(conn, [])  # only an open job may start empty


async def test_on_finish_follow_up_carries_the_outcome_and_refires_after_retry(conn) -> None:
    job = await conn.fetchval(
        "SELECT chunkd.create_sync_job('sync', '[{}, {}]'::jsonb, '{\"mailbox\": 7}'::jsonb, "
        "on_finish_kind => 'synced')"
    )
    a, b = await claim(conn, "w", 2, kinds=["sync"])
    assert await complete(conn, a["queue_id"], "w", 1)
    assert await fail(conn, b["queue_id"], "w", 1, retryable=False) == "failed"
    (follow,) = await claim(conn, "w", 5, kinds=["synced"])
    assert follow["job_payload"] == {"mailbox": 7}
    assert follow["payload"] == {
        "sync_job_id": str(job), "kind": "sync", "overall_status": "partial_failure",
        "total_chunks": 2, "completed_chunks": 1, "failed_chunks": 1, "cancelled_chunks": 0,
        "finished_at": follow["payload"]["finished_at"],
    }  # fmt: skip
    (event,) = await _finished_events(conn, job)
    assert event["detail"]["on_finish_job_id"] == str(follow["parent_sync_job_id"])
    # An operator retry re-opens the job; when it finishes again, it is announced again.
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    (again,) = await claim(conn, "w", 5, kinds=["sync"])
    assert await complete(conn, again["queue_id"], "w", again["attempt"])
    statuses = [e["status"] for e in await _finished_events(conn, job)]
    assert sorted(statuses) == ["completed", "partial_failure"]
    (second_follow,) = await claim(conn, "w", 5, kinds=["synced"])
    assert second_follow["payload"]["overall_status"] == "completed"


async def test_on_finish_runs_once_when_the_last_two_chunks_complete_at_once(pool, conn) -> None:
    """200 races: the last two chunks of a job completed on two connections at the same moment;
    exactly one of the two statements finishes the job."""
    rounds = 200
    jobs = [
        await conn.fetchval(
            "SELECT chunkd.create_sync_job('race', '[{}, {}]'::jsonb, on_finish_kind => 'after')"
        )
        for _ in range(rounds)
    ]
    start = asyncio.Event()

    async def complete_on_own_connection(queue_id: UUID, worker: str) -> bool:
        async with pool.acquire() as c:
            await start.wait()
            return await complete(c, queue_id, worker, 1)

    for _ in jobs:
        rows = await conn.fetch(
            "SELECT queue_id, chunk_id FROM chunkd.claim_next_chunk_job_safe('a', 1, '{race}') "
            "UNION ALL "
            "SELECT queue_id, chunk_id FROM chunkd.claim_next_chunk_job_safe('b', 1, '{race}')"
        )
        assert len(rows) == 2
        start.clear()
        tasks = [
            asyncio.create_task(complete_on_own_connection(rows[0]["queue_id"], "a")),
            asyncio.create_task(complete_on_own_connection(rows[1]["queue_id"], "b")),
        ]
        await asyncio.sleep(0)
        start.set()
        assert await asyncio.gather(*tasks) == [True, True]
    finished = await conn.fetch(
        "SELECT sync_job_id, count(*) AS n FROM chunkd.job_events "
        "WHERE event = 'job_finished' AND sync_job_id = ANY ($1) GROUP BY 1",
        jobs,
    )
    assert {r["sync_job_id"] for r in finished} == set(jobs)
    assert {r["n"] for r in finished} == {1}
    follow_ups = await conn.fetch(
        "SELECT c.payload->>'sync_job_id' AS of FROM chunkd.chunked_sync_jobs c "
        "JOIN chunkd.sync_jobs j ON j.id = c.sync_job_id WHERE j.kind = 'after'"
    )
    assert sorted(r["of"] for r in follow_ups) == sorted(str(j) for j in jobs)
