"""Flow control in SQL: pause and resume (jobs and kinds), rate limits (token buckets per kind
and per job), concurrency shared by a key; with concurrent claimers, on a real database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from chunkd.db import connect
from sql_helpers import (
    claim,
    claim_or_wait,
    complete,
    create_job,
    fail,
    make_due,
    status_counts,
)


async def _status(conn: asyncpg.Connection, job: UUID) -> str:
    return await conn.fetchval(
        "SELECT overall_status FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1",
        job,
    )


async def _depth(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT * FROM chunkd.queue_depth()")
    return {r["status"]: r["chunks"] for r in rows}


async def _notified(conn: asyncpg.Connection, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The payloads NOTIFYed on the daemon's channel while ``action`` ran and committed."""
    got: list[str] = []
    arrived = asyncio.Event()

    def listen(*args: Any) -> None:
        got.append(args[3])
        arrived.set()

    await conn.add_listener("chunkd", listen)
    try:
        await action()
        await asyncio.wait_for(arrived.wait(), 2)
    finally:
        await conn.remove_listener("chunkd", listen)
    return got


# --------------------------------------------------------------------------------------------
# Pause and resume
# --------------------------------------------------------------------------------------------


async def test_paused_job_is_not_claimed_its_flight_finishes_and_resume_wakes(
    conn, database
) -> None:
    paused = await create_job(conn, 5)
    (running,) = await claim(conn, "w", 1)
    other = await create_job(conn, 3)
    assert await conn.fetchval("SELECT chunkd.pause_sync_job($1)", paused) == 4
    assert await _status(conn, paused) == "paused"
    assert (await _depth(conn))["paused"] == 4
    rows = await claim(conn, "w", 10)
    assert {r["parent_sync_job_id"] for r in rows} == {other} and len(rows) == 3
    # The chunk in flight finishes normally.
    assert await complete(conn, running["queue_id"], "w", 1)
    assert await claim(conn, "w", 10) == []
    assert await status_counts(conn, paused) == {"completed": 1, "pending": 4}

    listener = await connect(database.dsn)
    try:
        resumed = await _notified(
            listener, lambda: conn.fetchval("SELECT chunkd.resume_sync_job($1)", paused)
        )
    finally:
        await listener.close()
    assert resumed == ["0"], "resume wakes idle daemons"
    assert await _status(conn, paused) == "processing"
    rows = await claim(conn, "w", 10)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    events = await conn.fetch(
        "SELECT event, status, worker_id, kind FROM chunkd.job_events"
        " WHERE sync_job_id = $1 AND event IN ('paused', 'resumed') ORDER BY at",
        paused,
    )
    user = await conn.fetchval("SELECT session_user")
    assert [tuple(e) for e in events] == [
        ("paused", "paused", user, "test"),
        ("resumed", "pending", user, "test"),
    ]


async def test_pause_keeps_retry_schedules_and_holds_them_when_due(conn) -> None:
    job = await create_job(conn, 2)
    (first, _second) = await claim(conn, "w", 2)
    assert await fail(conn, first["queue_id"], "w", 1, retry_in=timedelta(hours=1)) == "pending"
    run_at = await conn.fetchval(
        "SELECT run_at FROM chunkd.chunk_processing_queue WHERE id = $1", first["queue_id"]
    )
    await conn.fetchval("SELECT chunkd.pause_sync_job($1)", job)
    assert (
        await conn.fetchval(
            "SELECT run_at FROM chunkd.chunk_processing_queue WHERE id = $1", first["queue_id"]
        )
        == run_at
    ), "pausing leaves the retry's schedule alone"
    await make_due(conn, job)
    assert await claim(conn, "w", 10) == [], "a due retry of a paused job waits"
    await conn.fetchval("SELECT chunkd.resume_sync_job($1)", job)
    (again,) = await claim(conn, "w", 10)
    assert (again["seq"], again["attempt"]) == (0, 2)


async def test_pause_and_resume_are_idempotent_and_refuse_bad_targets(conn) -> None:
    job = await create_job(conn, 2)
    for _ in range(2):
        assert await conn.fetchval("SELECT chunkd.pause_sync_job($1)", job) == 2
    for _ in range(2):
        assert await conn.fetchval("SELECT chunkd.resume_sync_job($1)", job) == 2
    counts = await conn.fetch(
        "SELECT event, count(*) FROM chunkd.events GROUP BY 1 ORDER BY 1", timeout=5
    )
    assert [tuple(r) for r in counts] == [("paused", 1), ("resumed", 1)]
    missing = UUID(int=1)
    for function in ("pause_sync_job", "resume_sync_job"):
        with pytest.raises(asyncpg.NoDataFoundError, match="no sync job"):
            await conn.fetchval(f"SELECT chunkd.{function}($1)", missing)
    await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job)
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="cancelled"):
        await conn.fetchval("SELECT chunkd.pause_sync_job($1)", job)
    for bad in ("", "x" * 201, None):
        with pytest.raises(asyncpg.InvalidParameterValueError, match="kind must be"):
            await conn.fetchval("SELECT chunkd.pause_kind($1)", bad)


async def test_paused_kind_holds_present_and_future_jobs_of_that_kind_only(conn) -> None:
    a1 = await create_job(conn, 2, kind="a")
    b = await create_job(conn, 2, kind="b")
    assert await conn.fetchval("SELECT chunkd.pause_kind('a')") == 2
    a2 = await create_job(conn, 3, kind="a")
    assert await _status(conn, a1) == "paused" and await _status(conn, a2) == "paused"
    assert (await _depth(conn))["paused"] == 5
    rows = await claim(conn, "w", 10)
    assert {r["parent_sync_job_id"] for r in rows} == {b}
    assert await claim(conn, "w", 10, kinds=["a"]) == []
    assert await conn.fetchval("SELECT chunkd.resume_kind('a')") == 5
    assert await conn.fetchval("SELECT count(*) FROM chunkd.kind_flow") == 0, "no control left"
    rows = await claim(conn, "w", 10)
    assert len(rows) == 5
    events = await conn.fetch(
        "SELECT event, sync_job_id, kind FROM chunkd.job_events"
        " WHERE event IN ('paused', 'resumed') ORDER BY at"
    )
    assert [tuple(e) for e in events] == [("paused", None, "a"), ("resumed", None, "a")]


async def _seq_scans_of_ready(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    scans: int = await conn.fetchval(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE schemaname = 'chunkd' AND relname = 'ready'"
    )
    return scans


async def test_a_kind_pause_counts_its_pending_chunks_in_one_pass_over_the_queue(conn) -> None:
    """pause_kind holds `ready` in SHARE mode (no claim gets through) while it counts the kind's
    pending chunks: one pass over the queue, also when one big job makes the planner expect
    many rows per job (counting job by job then read the whole of `ready` once per job)."""
    await create_job(conn, 20_000, kind="big")
    await conn.execute("ANALYZE chunkd.ready")  # as if the queue held nothing but the big job
    for _ in range(6):
        await create_job(conn, 2, kind="mail")
    before = await _seq_scans_of_ready(conn)
    assert await conn.fetchval("SELECT chunkd.pause_kind('mail')") == 12
    assert await _seq_scans_of_ready(conn) - before <= 1
    assert await conn.fetchval("SELECT chunkd.resume_kind('mail')") == 12


async def test_a_pause_waits_for_a_claim_under_way_and_claims_after_it_see_it(database) -> None:
    """SHARE on the ready table, tried 50 ms at a time (issue 21, K12): a claim that holds
    chunks in an open transaction finishes before the pause commits; a claim started while the
    pause waits is not queued behind it (it goes ahead between two tries, and commits before
    the pause does); nothing is claimed after the pause commits; a claim started while the
    pause holds its lock waits for it and sees the pause."""
    setup = await connect(database.dsn)
    claimer = await connect(database.dsn)
    pauser = await connect(database.dsn)
    late = await connect(database.dsn)
    try:
        job = await create_job(setup, 11)
        # Started already: a job's first claim also stamps its row, which the pause locks.
        assert len(await claim(setup, "starter", 1)) == 1
        tx = claimer.transaction()
        await tx.start()
        first = await claim(claimer, "early", 2)
        pause = asyncio.create_task(pauser.fetchval("SELECT chunkd.pause_sync_job($1)", job))
        await asyncio.sleep(0.2)  # give it time to reach its lock: it must still be waiting
        assert not pause.done(), "the pause waits for the claim under way"
        later = await asyncio.wait_for(claim(late, "late", 10), 1)
        assert len(later) == 8, "a claim started meanwhile is not queued behind the pause"
        assert not pause.done()
        await tx.commit()
        assert await asyncio.wait_for(pause, 10) == 0, "nothing left to hold back"
        assert len(first) == 2
        pause_at = await setup.fetchval(
            "SELECT at FROM chunkd.events WHERE event = 'paused' AND job_id IS NOT NULL"
        )
        last_claim = await setup.fetchval("SELECT max(claimed_at) FROM chunkd.attempts")
        assert last_claim < pause_at

        second = await create_job(setup, 3)
        held = pauser.transaction()
        await held.start()
        assert await pauser.fetchval("SELECT chunkd.pause_sync_job($1)", second) == 3
        blocked = asyncio.create_task(claim(late, "late", 10))
        await asyncio.sleep(0.2)
        assert not blocked.done(), "a claim waits for the pause that holds its lock"
        await held.commit()
        assert await asyncio.wait_for(blocked, 10) == [], "and sees the pause"
    finally:
        for c in (setup, claimer, pauser, late):
            await c.close()


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


async def _bucket(conn: asyncpg.Connection, kind: str) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM chunkd.kind_flow WHERE kind = $1", kind)


async def test_kind_rate_limit_takes_whole_tokens_and_says_when_to_come_back(conn) -> None:
    await conn.execute("SELECT chunkd.set_rate_limit('r', 20)")
    bucket = await _bucket(conn, "r")
    # The default burst: a third of a second of the rate, rounded up.
    assert (bucket["per_second"], bucket["burst"], bucket["tokens"]) == (20, 7, 7)
    await create_job(conn, 60, kind="r")
    await create_job(conn, 5, kind="s")
    rows, wait = await claim_or_wait(conn, "w1", 30)
    by_kind = [r["kind"] for r in rows]
    assert by_kind.count("r") == 7 and by_kind.count("s") == 5, "the burst, and other kinds"
    # Out of tokens: come back when half the burst (3.5 tokens at 20/s) is due.
    assert wait is not None and 0.15 < wait <= 0.175
    rows, wait2 = await claim_or_wait(conn, "w2", 30)
    assert rows == []
    # The next claimer is given the turn after that one, not the same instant.
    assert wait2 is not None and 0.3 < wait2 <= 0.35
    # A claimer that holds a turn is not given another.
    rows, wait3 = await claim_or_wait(conn, "w3", 30, waiting_s=0.3)
    assert rows == [] and wait3 is None
    # A second of refill: the bucket holds at most its burst.
    await conn.execute(
        "UPDATE chunkd.kind_flow SET refilled_at = refilled_at - interval '1 second'"
    )
    rows, _ = await claim_or_wait(conn, "w1", 30)
    assert len(rows) == 7
    await conn.execute("SELECT chunkd.set_rate_limit('r', NULL)")
    assert await _bucket(conn, "r") is None
    rows, wait = await claim_or_wait(conn, "w1", 100)
    assert len(rows) == 46 and wait is None


async def test_changing_a_rate_keeps_the_tokens_and_a_paused_limited_kind_stays_paused(
    conn,
) -> None:
    await conn.execute("SELECT chunkd.set_rate_limit('r', 10, 4)")
    await create_job(conn, 20, kind="r")
    rows, _ = await claim_or_wait(conn, "w", 20)
    assert len(rows) == 4
    await conn.execute("SELECT chunkd.set_rate_limit('r', 100, 50)")
    assert (await _bucket(conn, "r"))["tokens"] < 1, "a new rate does not refill the bucket"
    await conn.execute("SELECT chunkd.pause_kind('r')")
    await conn.execute("UPDATE chunkd.kind_flow SET refilled_at = refilled_at - interval '1 s'")
    assert (await claim_or_wait(conn, "w", 20)) == ([], None), "paused: no turn either"
    await conn.execute("SELECT chunkd.resume_kind('r')")
    assert (await _bucket(conn, "r"))["per_second"] == 100, "resume keeps the rate"
    rows, _ = await claim_or_wait(conn, "w", 20)
    assert len(rows) == 16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("SELECT chunkd.set_rate_limit('k', 0)", "per_second must be"),
        ("SELECT chunkd.set_rate_limit('k', -5)", "per_second must be"),
        ("SELECT chunkd.set_rate_limit('k', 'NaN')", "per_second must be"),
        ("SELECT chunkd.set_rate_limit('k', 5, 0)", "burst must be"),
        ("SELECT chunkd.set_rate_limit('k', NULL, 5)", "a burst needs a rate"),
        ("SELECT chunkd.set_rate_limit('', 5)", "kind must be"),
        ("SELECT chunkd.set_concurrency_limit('t', 0)", "max_concurrency must be"),
        ("SELECT chunkd.set_concurrency_limit(NULL, 2)", "key must be"),
        ("SELECT chunkd.create_sync_job('k', '[1]', max_per_second => 0)", "max_per_second"),
        ("SELECT chunkd.create_sync_job('k', '[1]', concurrency_key => '')", "concurrency_key"),
    ],
)
async def test_bad_limits_are_one_clear_error_and_change_nothing(conn, call, message) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await conn.execute(call)
    assert (
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM chunkd.kind_flow) + (SELECT count(*) FROM chunkd.jobs)"
            " + (SELECT count(*) FROM chunkd.concurrency_limits)"
        )
        == 0
    )


async def test_per_job_rate_holds_beside_an_unlimited_job_of_the_same_kind(conn) -> None:
    slow = await create_job(conn, 10, max_per_second=4)  # burst 2
    fast = await create_job(conn, 20)
    rows, wait = await claim_or_wait(conn, "w", 10)
    jobs = [r["sync_job_id"] for r in rows]
    assert jobs.count(slow) == 2 and jobs.count(fast) == 8 and wait is None
    rows, wait = await claim_or_wait(conn, "w", 10)
    assert [r["sync_job_id"] for r in rows] == [fast] * 10 and wait is None, "a full batch"
    rows, wait = await claim_or_wait(conn, "w", 10)
    assert [r["sync_job_id"] for r in rows] == [fast] * 2
    assert wait is not None and 0.2 < wait <= 0.25, "one token at 4/s"
    assert (await _depth(conn))["throttled"] == 8


async def test_concurrent_claimers_never_exceed_the_rate(database) -> None:
    """Eight connections claim one limited kind as fast as they can for 1.5 s: every window of
    claims (database clock) stays within burst + rate x window."""
    rate, burst = 40.0, 4
    setup = await connect(database.dsn)
    await setup.execute("SELECT chunkd.set_rate_limit('r', $1, $2)", rate, burst)
    await create_job(setup, 1000, kind="r")

    async def claimer(i: int) -> int:
        c = await connect(database.dsn)
        got = 0
        try:
            stop = time.monotonic() + 1.5
            while time.monotonic() < stop:
                rows, _ = await claim_or_wait(c, f"w{i}", 7)
                got += len(rows)
        finally:
            await c.close()
        return got

    try:
        started = await setup.fetchval("SELECT clock_timestamp()")
        total = sum(await asyncio.gather(*(claimer(i) for i in range(8))))
        times = [
            r[0]
            for r in await setup.fetch("SELECT claimed_at FROM chunkd.attempts ORDER BY claimed_at")
        ]
    finally:
        await setup.close()
    assert total == len(times)
    elapsed = (times[-1] - started).total_seconds()
    assert total >= burst + rate * elapsed * 0.8, f"the limit was really reached: {total}"
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            window = (times[j] - first).total_seconds()
            assert j - i + 1 <= burst + rate * window + 1e-6, (i, j, window)


# --------------------------------------------------------------------------------------------
# Concurrency shared by a key
# --------------------------------------------------------------------------------------------

# The most attempts open at once over the whole history: +1 at each claim, -1 at each end (an
# end sorts before a claim at the same instant: intervals are half-open).
PEAK_IN_FLIGHT_SQL = """
SELECT max(n) FROM (
    SELECT sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n
    FROM (SELECT claimed_at AS t, 1 AS d FROM chunkd.attempts
          UNION ALL
          SELECT ended_at, -1 FROM chunkd.attempts WHERE ended_at IS NOT NULL) e
) x
"""


async def test_concurrency_key_is_shared_fairly_and_other_keys_proceed(conn) -> None:
    await conn.execute("SELECT chunkd.set_concurrency_limit('tenant-a', 2)")
    a_jobs = [await create_job(conn, 3, concurrency_key="tenant-a") for _ in range(5)]
    b_job = await create_job(conn, 3, concurrency_key="tenant-b")  # a key without a limit
    rows = await claim(conn, "w", 20)
    a_rows = [r for r in rows if r["parent_sync_job_id"] in a_jobs]
    assert [(r["parent_sync_job_id"], r["seq"]) for r in a_rows] == [(a_jobs[0], 0), (a_jobs[1], 0)]
    assert sum(r["parent_sync_job_id"] == b_job for r in rows) == 3
    assert await claim(conn, "w", 20) == []
    assert (await _depth(conn))["throttled"] == 13
    # A freed slot goes to the next job's first chunk: the key's jobs take turns.
    assert await complete(conn, a_rows[0]["queue_id"], "w", 1)
    (nxt,) = await claim(conn, "w", 20)
    assert (nxt["parent_sync_job_id"], nxt["seq"]) == (a_jobs[2], 0)
    await conn.execute("SELECT chunkd.set_concurrency_limit('tenant-a', NULL)")
    assert len(await claim(conn, "w", 20)) == 12


async def test_concurrent_claimers_never_exceed_a_shared_concurrency_limit(database) -> None:
    setup = await connect(database.dsn)
    await setup.execute("SELECT chunkd.set_concurrency_limit('t', 3)")
    for _ in range(6):
        await create_job(setup, 15, concurrency_key="t")
    await setup.close()

    async def claimer(i: int) -> int:
        c = await connect(database.dsn)
        done = 0
        try:
            while done < 200:
                rows = await claim(c, f"w{i}", 4)
                if not rows:
                    if not await c.fetchval("SELECT EXISTS (SELECT 1 FROM chunkd.ready)"):
                        return done
                    await asyncio.sleep(0.002)
                    continue
                await asyncio.sleep(0.005)
                for r in rows:
                    assert await complete(c, r["queue_id"], f"w{i}", r["attempt"])
                done += len(rows)
        finally:
            await c.close()
        return done

    assert sum(await asyncio.gather(*(claimer(i) for i in range(8)))) == 90
    check = await connect(database.dsn)
    try:
        peak = await check.fetchval(PEAK_IN_FLIGHT_SQL)
    finally:
        await check.close()
    assert peak == 3, f"at most 3 in flight, and the limit was reached: {peak}"


# --------------------------------------------------------------------------------------------
# The fast path, listings, depth
# --------------------------------------------------------------------------------------------


async def _slow_path_calls(conn: asyncpg.Connection, kinds: list[str]) -> int:
    """Calls of the slow path made by one claim (counted inside one transaction: the backend's
    counters are flushed between transactions, never within one)."""
    count = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
        " WHERE schemaname = 'chunkd' AND funcname = 'claim_flow'"
    )
    async with conn.transaction():
        await conn.execute("SET LOCAL track_functions = 'pl'")
        before = await conn.fetchval(count)
        await conn.fetch("SELECT * FROM chunkd.claim_or_wait('w', 10, $1, 60)", kinds)
        return int(await conn.fetchval(count) - before)


async def test_flow_control_of_other_kinds_leaves_the_fast_path_alone(conn) -> None:
    await create_job(conn, 3, kind="plain")
    await create_job(conn, 3, kind="limited", max_concurrency=1)
    await conn.execute("SELECT chunkd.set_rate_limit('rated', 5)")
    await conn.execute("SELECT chunkd.pause_kind('held')")
    await create_job(conn, 3, kind="plain")
    assert await _slow_path_calls(conn, ["plain"]) == 0
    assert await _slow_path_calls(conn, ["plain"]) == 0, "an empty queue: one cheap check"
    for kind in ("limited", "rated", "held"):
        assert await _slow_path_calls(conn, ["plain", kind]) == 1, kind


async def test_flow_limits_lists_every_control_in_effect(conn) -> None:
    await conn.execute("SELECT chunkd.set_rate_limit('mail', 20, 40)")
    await conn.execute("SELECT chunkd.pause_kind('imap')")
    await conn.execute("SELECT chunkd.set_concurrency_limit('tenant-1', 2)")
    job = await create_job(conn, 4, kind="mail", concurrency_key="tenant-1")
    await create_job(conn, 2, kind="mail", concurrency_key="tenant-2")
    paused = await create_job(conn, 3, kind="x", max_per_second=5)
    await conn.execute("SELECT chunkd.pause_sync_job($1)", paused)
    await claim(conn, "w", 1, kinds=["mail"])
    rows = await conn.fetch("SELECT * FROM chunkd.flow_limits()")
    got = {(r["scope"], r["name"]): dict(r) for r in rows}
    assert list(got) == [
        ("job", str(paused)),
        ("key", "tenant-1"),
        ("key", "tenant-2"),
        ("kind", "imap"),
        ("kind", "mail"),
    ]
    mail = got[("kind", "mail")]
    assert (mail["per_second"], mail["burst"]) == (20, 40)
    assert (mail["processing"], mail["pending"]) == (1, 5)
    assert mail["active_jobs"] == 2 and 38 <= mail["tokens"] <= 40
    assert got[("kind", "imap")]["paused_at"] is not None
    t1 = got[("key", "tenant-1")]
    assert (t1["max_concurrency"], t1["processing"]) == (2, 1)
    assert (t1["pending"], t1["active_jobs"]) == (3, 1)
    assert got[("key", "tenant-2")]["max_concurrency"] is None
    paused_row = got[("job", str(paused))]
    assert (paused_row["per_second"], paused_row["burst"]) == (5, 2)
    assert job is not None
