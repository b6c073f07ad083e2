"""Snoozes (chunkd.snooze_attempt, a handler's RetryLater): no attempt spent, the audit row with
its delay and reason, the bound, the fence on the claim itself, and fail_chunk_job_safe's
retry_in, which stays a retry that spends its attempt."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from sql_helpers import claim, claim_or_wait, create_job, fail, make_due, queue_row

LEASE_S = 600.0


async def _snooze(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    delay_s: Any,
    reason: str = "RetryLater: 429",
    *,
    worker: str = "w",
    max_snoozes: Any = 20,
    claimed_until: Any = "from the claim",
) -> str | None:
    """The daemon's statement, as chunkd.db.Queue.snooze sends it for a claimed row."""
    return await conn.fetchval(
        "SELECT chunkd.snooze_attempt($1, $2, $3, $4, $5, $6, $7, $8)",
        worker,
        row["id"],
        row["attempt"],
        reason,
        delay_s,
        max_snoozes,
        row["lease_expires_at"] if claimed_until == "from the claim" else claimed_until,
        LEASE_S,
    )


async def _claim_one(conn: asyncpg.Connection, worker: str = "w") -> asyncpg.Record:
    rows, _ = await claim_or_wait(conn, worker, 1, lease_s=LEASE_S)
    assert len(rows) == 1, rows
    return rows[0]


async def _outcomes(conn: asyncpg.Connection, queue_id: UUID) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT event, status, attempt, error, delay_s FROM chunkd.chunk_events"
        " WHERE queue_id = $1 AND event NOT IN ('enqueued', 'claimed') ORDER BY at",
        queue_id,
    )
    return [tuple(r) for r in rows]


async def test_three_snoozes_spend_no_attempt_and_are_audited_with_delay_and_reason(conn) -> None:
    job = await create_job(conn, 1, max_attempts=3)
    for n, delay in enumerate([5.0, 10.0, 0.25], start=1):
        row = await _claim_one(conn)
        assert row["attempt"] == 1, "a snoozed chunk comes back with the same attempt"
        assert await _snooze(conn, row, delay, f"RetryLater: 429 number {n}") == "snoozed"
        waiting = await queue_row(conn, row["queue_id"])
        assert (waiting["status"], waiting["attempts"]) == ("pending", 0)
        ahead_s = await conn.fetchval(
            "SELECT extract(epoch FROM run_at - now())::float8 FROM chunkd.chunk_processing_queue"
            " WHERE id = $1",
            row["queue_id"],
        )
        assert ahead_s == pytest.approx(delay, abs=0.01)
        await make_due(conn)
    row = await _claim_one(conn)
    assert row["attempt"] == 1
    assert await conn.fetchval(
        "SELECT chunkd.complete_attempts('w', $1, $2)", [row["id"]], [1]
    ) == row["id"]  # fmt: skip
    done = await queue_row(conn, row["queue_id"])
    assert (done["status"], done["attempts"], done["max_attempts"]) == ("completed", 1, 3)
    assert await _outcomes(conn, row["queue_id"]) == [
        ("snoozed", "pending", 0, "RetryLater: 429 number 1", 5.0),
        ("snoozed", "pending", 0, "RetryLater: 429 number 2", 10.0),
        ("snoozed", "pending", 0, "RetryLater: 429 number 3", 0.25),
        ("completed", "completed", 1, None, None),
    ]
    claims = await conn.fetch(
        "SELECT attempt FROM chunkd.chunk_events WHERE queue_id = $1 AND event = 'claimed'",
        row["queue_id"],
    )
    assert [c["attempt"] for c in claims] == [1, 1, 1, 1]
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["overall_status"] == "completed"


async def test_past_the_limit_a_retry_later_spends_attempts_then_fails(conn) -> None:
    job = await create_job(conn, 1, max_attempts=2)
    statuses = []
    for _ in range(4):
        await make_due(conn)
        row = await _claim_one(conn)
        statuses.append((row["attempt"], await _snooze(conn, row, 7.5, max_snoozes=2)))
    # Two snoozes; then each RetryLater is a failed attempt, retried after the delay it asked.
    assert statuses == [(1, "snoozed"), (1, "snoozed"), (1, "pending"), (2, "failed")]
    limit = "snooze limit (2) reached, counted as an attempt: RetryLater: 429"
    (queue_id,) = await conn.fetchrow(
        "SELECT id FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
    )
    assert await _outcomes(conn, queue_id) == [
        ("snoozed", "pending", 0, "RetryLater: 429", 7.5),
        ("snoozed", "pending", 0, "RetryLater: 429", 7.5),
        ("retry_scheduled", "pending", 1, limit, 7.5),
        ("failed", "failed", 2, limit, None),
    ]
    failed = await queue_row(conn, queue_id)
    assert (failed["status"], failed["attempts"], failed["error_message"]) == ("failed", 2, limit)
    status = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)->>'overall_status'", job)
    assert status == "partial_failure"
    # An operator's retry starts the count again, as it starts the attempts again.
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    row = await _claim_one(conn)
    assert row["attempt"] == 1
    assert await _snooze(conn, row, 7.5, max_snoozes=2) == "snoozed"


async def test_max_snoozes_zero_makes_every_retry_later_an_attempt(conn) -> None:
    await create_job(conn, 1, max_attempts=3)
    row = await _claim_one(conn)
    assert await _snooze(conn, row, 1.0, max_snoozes=0) == "pending"
    assert (await queue_row(conn, row["queue_id"]))["attempts"] == 1


@pytest.mark.parametrize("max_concurrency", [None, 1], ids=["fast path", "flow-control path"])
async def test_a_resent_snooze_of_an_earlier_claim_does_not_end_the_claim_after_it(
    conn, max_concurrency
) -> None:
    """The chunk comes back with the same attempt number to the same worker: a snooze sent
    again after its reply was lost must not end that new claim."""
    await create_job(conn, 1, max_concurrency=max_concurrency)
    first = await _claim_one(conn)
    assert await _snooze(conn, first, 0) == "snoozed"
    second = await _claim_one(conn)
    assert (second["id"], second["attempt"]) == (first["id"], first["attempt"])
    assert second["lease_expires_at"] > first["lease_expires_at"]
    # The first claim's report again: same (chunk, attempt, worker), and refused.
    assert await _snooze(conn, first, 0) is None
    held = await queue_row(conn, second["queue_id"])
    assert (held["status"], held["worker_id"]) == ("processing", "w")
    assert await conn.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE queue_id = $1 AND event = 'snoozed'",
        first["queue_id"],
    ) == 1  # fmt: skip
    # The second claim's own snooze is taken.
    assert await _snooze(conn, second, 0) == "snoozed"
    # And without the claim's identity, the fence is the one of every outcome: it matches.
    third = await _claim_one(conn)
    assert await _snooze(conn, third, 0, claimed_until=None) == "snoozed"


async def test_another_worker_or_attempt_is_fenced_out(conn) -> None:
    await create_job(conn, 1)
    row = await _claim_one(conn)
    before = await queue_row(conn, row["queue_id"])
    assert await _snooze(conn, row, 1.0, worker="other") is None
    assert await _snooze(conn, {**dict(row), "attempt": 2}, 1.0) is None
    assert dict(await queue_row(conn, row["queue_id"])) == dict(before)


@pytest.mark.parametrize(
    ("delay_s", "max_snoozes", "message"),
    [
        (float("nan"), 20, "finite delay of 0 seconds or more, got NaN"),
        (-1.0, 20, "finite delay of 0 seconds or more, got -1"),
        (float("inf"), 20, "finite delay of 0 seconds or more, got Infinity"),
        (None, 20, "finite delay of 0 seconds or more, got NULL"),
        (1.0, -1, "max_snoozes must be >= 0, got -1"),
    ],
)
async def test_a_delay_or_limit_out_of_range_is_a_data_error_and_changes_nothing(
    conn, delay_s, max_snoozes, message
) -> None:
    await create_job(conn, 1)
    row = await _claim_one(conn)
    before = await queue_row(conn, row["queue_id"])
    with pytest.raises(asyncpg.PostgresError, match=message) as info:
        await _snooze(conn, row, delay_s, max_snoozes=max_snoozes)
    assert info.value.sqlstate == "22023"  # class 22: the daemon sends it again as a failure
    assert dict(await queue_row(conn, row["queue_id"])) == dict(before)


async def test_a_snoozed_chunk_holds_its_place_in_a_one_at_a_time_job(conn) -> None:
    await create_job(conn, 3, max_concurrency=1)
    row = await _claim_one(conn)
    assert await _snooze(conn, row, 3600) == "snoozed"
    assert await claim(conn, "w", 5) == [], "the later chunks wait for the snoozed one"
    await make_due(conn)
    again = await _claim_one(conn)
    assert (again["seq"], again["attempt"]) == (0, 1)


async def test_fail_chunk_job_safe_retry_in_is_a_retry_that_spends_the_attempt(conn) -> None:
    """The public failure report keeps its meaning: retry_in is not a snooze."""
    await create_job(conn, 1, max_attempts=2)
    (row,) = await claim(conn, "w", 1)
    assert await fail(conn, row["queue_id"], "w", 1, "429", retry_in=timedelta(seconds=42)) == (
        "pending"
    )
    assert (await queue_row(conn, row["queue_id"]))["attempts"] == 1
    assert await _outcomes(conn, row["queue_id"]) == [
        ("retry_scheduled", "pending", 1, "429", 42.0)
    ]
    await make_due(conn)
    (again,) = await claim(conn, "w", 1)
    assert again["attempt"] == 2
    assert await fail(conn, row["queue_id"], "w", 2, "429", retry_in=timedelta(seconds=42)) == (
        "failed"
    )


async def test_upgrading_keeps_the_worker_grants_and_a_claim_made_before_can_snooze(
    empty_database,
) -> None:
    """From release 0.2.0's schema (migration 8): a role that could run the daemon, so execute
    fail_attempt, may execute snooze_attempt; a chunk claimed before the upgrade is snoozed by
    the new statement, and its audit rows from before read as they did (no delay)."""
    from chunkd.db import connect
    from chunkd.db.migrate import apply_migrations

    role = f"chunkd_snooze_{uuid.uuid4().hex[:10]}"
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=8)
        await conn.execute(f"CREATE ROLE {role}")
        await conn.execute(
            "GRANT EXECUTE ON FUNCTION chunkd.fail_attempt(text, bigint, int, text, boolean,"
            f" float8, float8, float8) TO {role}"
        )
        job = await create_job(conn, 2)
        retried = await _claim_one(conn, "old")
        assert await conn.fetchval(
            "SELECT chunkd.fail_attempt('old', $1, 1, 'boom', true, 60)", retried["id"]
        ) == "pending"  # fmt: skip
        held = await _claim_one(conn, "old")

        await apply_migrations(conn)
        assert await conn.fetchval(
            "SELECT has_function_privilege($1, 'chunkd.snooze_attempt(text, bigint, int, text,"
            " float8, int, timestamptz, float8)', 'EXECUTE')",
            role,
        )
        assert await _snooze(conn, held, 30.0, worker="old") == "snoozed"
        rows = await conn.fetch(
            "SELECT event, attempt, delay_s FROM chunkd.chunk_events"
            " WHERE sync_job_id = $1 AND event IN ('retry_scheduled', 'snoozed') ORDER BY at",
            job,
        )
        assert [tuple(r) for r in rows] == [("retry_scheduled", 1, None), ("snoozed", 0, 30.0)]
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
