"""Retention (issue 25): finished jobs move from the live tables to the history, which is
partitioned by when its rows expire; policies per terminal state; nothing is removed early;
expired partitions are dropped; a finished job reads the same before and after it moved."""

from __future__ import annotations

import json
from datetime import timedelta
from uuid import UUID

import asyncpg
import pytest

from chunkd.db import connect
from history_helpers import (
    counts_match,
    history_rows,
    job_reads,
    live_rows,
    rounds_until_idle,
    run_round,
    wait_for_round,
)
from sql_helpers import claim, complete, create_job, fail


async def set_policies(conn: asyncpg.Connection, **keep_s: float) -> None:
    for state, seconds in keep_s.items():
        await conn.execute("SELECT chunkd.set_retention($1, $2)", state, timedelta(seconds=seconds))


async def finish_completed(conn: asyncpg.Connection, n: int = 3, kind: str = "done") -> UUID:
    job = await create_job(conn, n, kind=kind)
    for row in await claim(conn, "w1", n, kinds=[kind]):
        assert await complete(conn, row["queue_id"], "w1", row["attempt"], {"seq": row["seq"]})
    return job


async def finish_failed(conn: asyncpg.Connection, kind: str = "broken") -> UUID:
    """Two chunks: one completed after a retry, one failed for good: partial_failure."""
    job = await create_job(conn, 2, kind=kind, max_attempts=2)
    rows = await claim(conn, "w1", 2, kinds=[kind])
    assert await fail(conn, rows[0]["queue_id"], "w1", 1, "timeout", retry_in=timedelta(0))
    assert await fail(conn, rows[1]["queue_id"], "w1", 1, "bad input", retryable=False)
    (again,) = await claim(conn, "w2", 1, kinds=[kind])
    assert await complete(conn, again["queue_id"], "w2", 2, {"ok": True})
    return job


async def finish_cancelled(conn: asyncpg.Connection, kind: str = "stopped") -> UUID:
    """Three chunks: one completed, one cancelled while processing, one while pending."""
    job = await create_job(conn, 3, kind=kind)
    first, _in_flight = await claim(conn, "w1", 2, kinds=[kind])
    assert await complete(conn, first["queue_id"], "w1", 1)
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 2
    return job


async def expiry_of(conn: asyncpg.Connection, job: UUID) -> timedelta:
    return await conn.fetchval(
        "SELECT expires_at - finished_at FROM chunkd.history_jobs WHERE public_id = $1", job
    )


async def test_a_finished_job_reads_the_same_before_and_after_it_moved(conn) -> None:
    jobs = [
        await finish_completed(conn),
        await finish_failed(conn),
        await finish_cancelled(conn),
    ]
    # A rate-limited job paused and resumed on its way (its own events, its bucket's burst).
    limited = await create_job(conn, 2, kind="paced", max_per_second=5)
    await conn.execute("SELECT chunkd.pause_sync_job($1)", limited)
    await conn.execute("SELECT chunkd.resume_sync_job($1)", limited)
    for row in await claim(conn, "w1", 2, kinds=["paced"]):
        assert await complete(conn, row["queue_id"], "w1", row["attempt"])
    jobs.append(limited)
    # And an operator's retry of a failed chunk ('retried' in the audit trail).
    retried = await finish_failed(conn, kind="retried")
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", retried) == 1
    (row,) = await claim(conn, "w3", 1, kinds=["retried"])
    assert await complete(conn, row["queue_id"], "w3", row["attempt"])
    jobs.append(retried)

    before = {job: await job_reads(conn, job) for job in jobs}
    counts_before = await conn.fetch("SELECT * FROM chunkd.sync_job_status_counts() ORDER BY 1")
    kinds_before = await conn.fetch("SELECT * FROM chunkd.sync_job_kinds()")
    assert await rounds_until_idle(conn) == len(jobs)
    for job in jobs:
        assert await live_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
        moved = await history_rows(conn, job)
        assert moved["jobs"] == 1 and moved["chunks"] > 0 and moved["attempts"] > 0
        after = await job_reads(conn, job)
        assert [len(found) for found in after["search"]] == [1, 1, 1, 1], "the search finds it"
        for name, rows in before[job].items():
            assert after[name] == rows, (job, name)
        assert after == before[job]
    assert await conn.fetch("SELECT * FROM chunkd.sync_job_status_counts() ORDER BY 1") == (
        counts_before
    )
    assert await conn.fetch("SELECT * FROM chunkd.sync_job_kinds()") == kinds_before
    await counts_match(conn)


async def test_each_terminal_state_expires_by_its_own_policy(conn) -> None:
    await set_policies(conn, completed=3600, failed=7200, cancelled=10800)
    done, failed, cancelled = (
        await finish_completed(conn),
        await finish_failed(conn),
        await finish_cancelled(conn),
    )
    assert await rounds_until_idle(conn) == 3
    assert await expiry_of(conn, done) == timedelta(hours=1)
    assert await expiry_of(conn, failed) == timedelta(hours=2)
    assert await expiry_of(conn, cancelled) == timedelta(hours=3)
    # Every row of a job has the job's expiry: it sits in the same partition of each table.
    spread = await conn.fetchval(
        "SELECT count(DISTINCT (j.id, x.expires_at)) - count(DISTINCT j.id) FROM ("
        "  SELECT job_id, expires_at FROM chunkd.history_chunks UNION ALL"
        "  SELECT job_id, expires_at FROM chunkd.history_attempts UNION ALL"
        "  SELECT job_id, expires_at FROM chunkd.history_events) x"
        " JOIN chunkd.history_jobs j ON j.id = x.job_id"
    )
    assert spread == 0
    policies = await conn.fetch("SELECT state, keep_s FROM chunkd.retention_policies()")
    assert [tuple(p) for p in policies] == [
        ("completed", 3600.0),
        ("failed", 7200.0),
        ("cancelled", 10800.0),
    ]


async def test_nothing_goes_early_and_expired_partitions_are_dropped(conn) -> None:
    # Partitions of 1 s (a quarter of the shortest, at least a sixtieth of the longest).
    await set_policies(conn, completed=1, failed=50, cancelled=50)
    running = await create_job(conn, 3, kind="running")
    (held,) = await claim(conn, "w1", 1, kinds=["running"])
    failed = await finish_failed(conn)
    done = await finish_completed(conn)
    running_before = await live_rows(conn, running)
    failed_before = await job_reads(conn, failed)
    first = await run_round(conn)
    assert first["ran"] and first["moved_jobs"] == 2 and first["created_partitions"] == 2
    partitions = await conn.fetch(
        "SELECT from_at, suffix FROM chunkd.history_partitions ORDER BY from_at"
    )
    done_suffix = partitions[0]["suffix"]
    # The completed job's partition goes once its range is past (a second or two).
    await wait_for_round(
        conn, f"to_regclass('chunkd.history_jobs_p{done_suffix}') IS NULL", timeout_s=20
    )
    for table in ("history_jobs", "history_chunks", "history_attempts", "history_events"):
        assert await conn.fetchval("SELECT to_regclass($1)", f"chunkd.{table}_p{done_suffix}") is (
            None
        )
    assert await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", done) is None
    assert await history_rows(conn, done) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    # The failed job, inside its window, and the running job are untouched.
    assert await job_reads(conn, failed) == failed_before
    assert await live_rows(conn, running) == running_before
    assert running_before == {"jobs": 1, "chunks": 3, "attempts": 1, "events": 0}
    assert await history_rows(conn, running) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert await complete(conn, held["queue_id"], "w1", 1)
    await counts_match(conn)
    assert {r["overall_status"]: r["jobs"] for r in await conn.fetch(
        "SELECT * FROM chunkd.sync_job_status_counts()"
    )} == {"processing": 1, "partial_failure": 1}  # fmt: skip


async def test_a_job_already_expired_when_it_moves_is_deleted_instead(conn) -> None:
    await set_policies(conn, completed=1)
    job = await finish_completed(conn)
    await conn.execute("SELECT pg_sleep(1.1)")
    row = await run_round(conn)
    assert (row["moved_jobs"], row["expired_jobs"], row["created_partitions"]) == (0, 1, 0)
    assert await live_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert await history_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}


async def test_a_big_job_moves_in_pieces_and_reads_the_same_meanwhile(conn) -> None:
    job = await create_job(conn, 25, kind="big")
    for row in await claim(conn, "w1", 25, kinds=["big"]):
        if row["seq"] == 7:
            assert await fail(conn, row["queue_id"], "w1", 1, "nope", retryable=False)
        else:
            assert await complete(conn, row["queue_id"], "w1", row["attempt"])
    before = await job_reads(conn, job)
    moved = []
    for _ in range(3):
        row = await run_round(conn, max_chunks=10)
        moved.append((row["moved_jobs"], row["moved_chunks"], row["more"]))
        assert await job_reads(conn, job) == before
    assert moved == [(0, 10, True), (0, 10, True), (1, 5, False)]
    assert await live_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert await conn.fetchval("SELECT count(*) FROM chunkd.history_moving") == 0
    await counts_match(conn)


async def test_a_retry_restores_the_job_with_its_ids_then_retries_it(conn) -> None:
    job = await finish_failed(conn)
    ids = await conn.fetch(
        "SELECT j.id, c.id AS chunk FROM chunkd.jobs j JOIN chunkd.chunks c ON c.job_id = j.id"
        " WHERE j.public_id = $1 ORDER BY c.seq",
        job,
    )
    before = await job_reads(conn, job)
    await rounds_until_idle(conn)
    assert await conn.fetchval("SELECT chunkd.restore_job($1)", job) == ids[0]["id"]
    assert await job_reads(conn, job) == before
    assert (
        await conn.fetch(
            "SELECT j.id, c.id AS chunk FROM chunkd.jobs j JOIN chunkd.chunks c ON c.job_id = j.id"
            " WHERE j.public_id = $1 ORDER BY c.seq",
            job,
        )
        == ids
    )
    assert await history_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    await counts_match(conn)
    # Moved again, the operator's retry brings it back and requeues the failed chunk.
    await rounds_until_idle(conn)
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    progress = json.loads(await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)::text", job))
    assert (progress["overall_status"], progress["pending_chunks"]) == ("processing", 1)
    (row,) = await claim(conn, "w9", 1, kinds=["broken"])
    assert row["attempt"] == 1 and await complete(conn, row["queue_id"], "w9", 1)
    await counts_match(conn)


async def test_a_retry_of_a_job_moving_in_pieces_brings_every_piece_back(conn) -> None:
    job = await create_job(conn, 12, kind="big", max_attempts=1)
    for row in await claim(conn, "w1", 12, kinds=["big"]):
        assert await fail(conn, row["queue_id"], "w1", 1, "down", retryable=False)
    assert (await run_round(conn, max_chunks=5))["moved_chunks"] == 5
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 12
    assert await history_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert len(await claim(conn, "w2", 20, kinds=["big"])) == 12


async def test_operator_actions_on_a_job_in_the_history(conn) -> None:
    done = await finish_completed(conn)
    cancelled = await finish_cancelled(conn)
    await rounds_until_idle(conn)
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", done) == 0
    assert await conn.fetchval("SELECT chunkd.pause_sync_job($1)", done) == 0
    assert await conn.fetchval("SELECT chunkd.resume_sync_job($1)", done) == 0
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", done) == 0
    assert await conn.fetchval("SELECT chunkd.close_sync_job($1)", done) is False
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="closed"):
        await conn.execute("SELECT chunkd.append_chunks($1, '[{}]')", done)
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="cancelled"):
        await conn.execute("SELECT chunkd.retry_failed_chunks($1)", cancelled)
    # Nothing of it came back or changed.
    assert (await history_rows(conn, done))["jobs"] == 1
    assert await live_rows(conn, done) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    with pytest.raises(asyncpg.NoDataFoundError, match="no sync job"):
        await conn.execute("SELECT chunkd.cancel_sync_job('00000000-0000-0000-0000-000000000000')")


async def test_purge_deletes_the_history_too(conn) -> None:
    old = [await finish_completed(conn), await finish_failed(conn)]
    await rounds_until_idle(conn)
    live = await finish_completed(conn, kind="recent")
    assert await conn.fetchval("SELECT chunkd.purge_finished_jobs('0 seconds')") == 3
    for job in (*old, live):
        assert await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job) is None
        assert await history_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    await counts_match(conn)
    assert await conn.fetch("SELECT * FROM chunkd.sync_job_status_counts()") == []


async def test_purge_of_a_job_moving_in_pieces_deletes_its_pieces(conn) -> None:
    job = await create_job(conn, 12, kind="big")
    for row in await claim(conn, "w1", 12, kinds=["big"]):
        assert await complete(conn, row["queue_id"], "w1", row["attempt"])
    assert (await run_round(conn, max_chunks=5))["moved_chunks"] == 5
    assert (await history_rows(conn, job))["chunks"] == 5
    assert await conn.fetchval("SELECT chunkd.purge_finished_jobs('0 seconds')") == 1
    assert await history_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert await live_rows(conn, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
    assert await conn.fetchval("SELECT count(*) FROM chunkd.history_moving") == 0


async def test_one_daemon_at_a_time_and_an_operator_holding_a_job_goes_first(
    conn, database
) -> None:
    job = await finish_failed(conn)
    other = await connect(database.dsn)
    try:
        # An operator's retry under way holds the job's row: the round passes it by.
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM chunkd.jobs WHERE public_id = $1 FOR NO KEY UPDATE", job
            )
            row = await run_round(conn)
            assert row["ran"] and row["moved_jobs"] == 0 and row["more"]
        # A round under way (its transaction holds the lock): the others do nothing.
        async with other.transaction():
            assert (await run_round(other))["moved_jobs"] == 1
            skipped = await run_round(conn)
            assert not skipped["ran"] and skipped["moved_jobs"] == 0
    finally:
        await other.close()
    assert (await history_rows(conn, job))["jobs"] == 1


@pytest.mark.parametrize(
    ("state", "keep", "message"),
    [
        ("done", "1 day", "no retention state 'done': completed, failed or cancelled"),
        ("completed", "0 seconds", "between 1 second and 36500 days"),
        ("failed", None, "between 1 second and 36500 days"),
    ],
)
async def test_bad_policies_are_refused(conn, state: str, keep: str | None, message: str) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await conn.execute("SELECT chunkd.set_retention($1, $2::text::interval)", state, keep)


@pytest.mark.parametrize("max_chunks", [0, -1, None, 1_000_001, 2_147_483_647])
async def test_a_round_of_no_size_or_beyond_a_million_chunks_is_refused(
    conn, max_chunks: int | None
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match="between 1 and 1000000"):
        await conn.execute("SELECT * FROM chunkd.retention_round($1)", max_chunks)


async def test_partial_failure_names_the_failed_policy(conn) -> None:
    await conn.execute("SELECT chunkd.set_retention('Partial_Failure', '5 days')")
    assert await conn.fetchval("SELECT keep_s FROM chunkd.retention WHERE state = 'failed'") == (
        5 * 86400
    )


async def test_the_partition_width_follows_the_policies(conn) -> None:
    width = "SELECT chunkd.history_width_s()"
    assert await conn.fetchval(width) == 18 * 3600  # a quarter of 3 days (the defaults)
    await set_policies(conn, completed=60, failed=3600, cancelled=3600)
    assert await conn.fetchval(width) == 60  # a sixtieth of an hour beats a quarter minute
    await set_policies(conn, completed=4, failed=4, cancelled=4)
    assert await conn.fetchval(width) == 1
    await set_policies(conn, completed=30 * 86400, failed=365 * 86400, cancelled=30 * 86400)
    assert await conn.fetchval(width) == 6 * 86400 + 2 * 3600  # 365 days / 60


async def test_partitions_of_another_width_fit_around_those_there(conn) -> None:
    """A policy change changes the width of new partitions; a new one is cut short where an
    old one begins or ends, so ranges never overlap and every expiry has its partition."""
    await set_policies(conn, completed=3600, failed=3600, cancelled=3600)  # 15-minute partitions
    first = await finish_completed(conn)
    await rounds_until_idle(conn)
    # Day-wide partitions from now (a sixtieth of 60 days); the next job expires 90 minutes
    # after the first, beyond its partition, in a day that partition is part of.
    await set_policies(conn, completed=5400, failed=60 * 86400, cancelled=3600)
    assert await conn.fetchval("SELECT chunkd.history_width_s()") == 86400
    second = await finish_completed(conn)
    await rounds_until_idle(conn)
    ranges = await conn.fetch(
        "SELECT from_at, to_at FROM chunkd.history_partitions ORDER BY from_at"
    )
    assert len(ranges) == 2
    assert ranges[0]["to_at"] <= ranges[1]["from_at"]
    for job in (first, second):
        expiry = await conn.fetchval(
            "SELECT expires_at FROM chunkd.history_jobs WHERE public_id = $1", job
        )
        assert sum(r["from_at"] <= expiry < r["to_at"] for r in ranges) == 1
