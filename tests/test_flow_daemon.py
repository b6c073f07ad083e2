"""Flow control with real ``chunkd run`` daemons: the acceptance points of issue #13, each
checked from what the database recorded (attempts, audit events, function call counters)."""

from __future__ import annotations

import bisect
import itertools
from datetime import datetime
from uuid import UUID

import asyncpg

from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts
from test_metrics import _free_port, _scrape, _value

RECORD = "test=daemon_handlers:record"
FAST = ["--reap-interval", "500ms", "--retry-base", "100ms", "--retry-cap", "1s"]


async def _workers(conn: asyncpg.Connection, n: int) -> None:
    async def ready() -> bool:
        return await conn.fetchval("SELECT count(*) FROM chunkd.workers") == n

    await wait_until(ready, timeout_s=30, what=f"{n} registered daemons")


async def _all_done(conn: asyncpg.Connection, job: UUID) -> bool:
    counts = await status_counts(conn, job)
    return set(counts) == {"completed"}


async def _attempts(conn: asyncpg.Connection, job: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT c.seq, a.claimed_at, a.ended_at, a.outcome, a.worker_id"
        " FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id"
        " JOIN chunkd.jobs j ON j.id = a.job_id WHERE j.public_id = $1 ORDER BY a.claimed_at",
        job,
    )


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def _peak(intervals: list[tuple[datetime, datetime]]) -> int:
    """Most intervals open at once (half-open: an end sorts before a start at one instant)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    return max(itertools.accumulate(d for _, d in edges))


async def _exactly_once(conn: asyncpg.Connection, job: UUID, total: int) -> None:
    runs = await conn.fetch(
        "SELECT count(*) AS n FROM public.test_executions WHERE job_id = $1 GROUP BY chunk_id", job
    )
    assert len(runs) == total and {r["n"] for r in runs} == {1}


async def test_pause_stops_claims_at_once_in_flight_finishes_resume_within_200ms(db, start) -> None:
    total = 400
    job = await create_job(db, [{"sleep_s": 0.05}] * total)
    daemons = [start("--handler", RECORD, "--concurrency", "4", *FAST) for _ in range(3)]

    async def progressed() -> bool:
        return (await status_counts(db, job)).get("completed", 0) >= 60

    await wait_until(progressed, timeout_s=30, what="60 completions")
    held = await db.fetchval("SELECT chunkd.pause_sync_job($1)", job)
    paused_at = await db.fetchval(
        "SELECT e.at FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id"
        " WHERE j.public_id = $1 AND e.event = 'paused'",
        job,
    )

    async def flight_landed() -> bool:
        return not await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id"
            " WHERE j.public_id = $1 AND a.ended_at IS NULL)",
            job,
        )

    await wait_until(flight_landed, timeout_s=10, what="the chunks in flight to finish")
    assert (await status_counts(db, job)).get("pending") == held > 0
    status = await db.fetchval(
        "SELECT overall_status FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1",
        job,
    )
    assert status == "paused"

    assert await db.fetchval("SELECT chunkd.resume_sync_job($1)", job) == held
    resumed_at = await db.fetchval(
        "SELECT e.at FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id"
        " WHERE j.public_id = $1 AND e.event = 'resumed'",
        job,
    )
    await wait_until(lambda: _all_done(db, job), timeout_s=60, what="the resumed job")
    attempts = await _attempts(db, job)
    before = [a for a in attempts if a["claimed_at"] < paused_at]
    after = [a for a in attempts if a["claimed_at"] >= paused_at]
    # The audit trail: no claim between the pause and the resume.
    assert all(a["claimed_at"] > resumed_at for a in after), "claimed while paused"
    in_flight = [a for a in before if a["ended_at"] > paused_at]
    assert in_flight, "chunks were in flight when the pause committed"
    assert {a["outcome"] for a in attempts} == {"completed"}, "in flight finished normally"
    latency_s = _seconds(resumed_at, after[0]["claimed_at"])
    assert 0 < latency_s < 0.2, f"idle daemons resumed the job after {latency_s:.3f}s"
    assert len(before) + len(after) == total
    await _exactly_once(db, job, total)
    for daemon in daemons:
        assert await daemon.stop() == 0


async def test_kind_limited_to_20_per_second_holds_fleet_wide_and_idles_cheaply(
    db, database, start
) -> None:
    """600 short chunks of a kind limited to 20/s, 3 daemons of concurrency 16: every 5 s window
    of completions within 20/s +-10 %, and fewer than 10 claim statements per second in all
    (the daemons' calls of chunkd.claim_batch, counted by the server)."""
    await db.execute(f"ALTER DATABASE \"{database.name}\" SET track_functions = 'pl'")
    await db.execute("SELECT chunkd.set_rate_limit('paced', 20)")
    handler = "paced=daemon_handlers:record"
    daemons = [start("--handler", handler, "--concurrency", "16", *FAST) for _ in range(3)]
    await _workers(db, 3)
    calls_sql = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE schemaname = 'chunkd' AND funcname = 'claim_batch'"
    )
    await db.execute("SELECT pg_stat_clear_snapshot()")
    calls_before = await db.fetchval(calls_sql)  # flushed counts only: the delta over-counts
    enqueued_at = await db.fetchval("SELECT clock_timestamp()")
    job = await create_job(db, [{"sleep_s": 0.01}] * 600, kind="paced")
    await wait_until(lambda: _all_done(db, job), timeout_s=90, what="600 paced chunks")
    for daemon in daemons:
        assert await daemon.stop() == 0

    async def backends_gone() -> bool:  # each flushes its counters as it exits
        return not await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid())"
        )

    await wait_until(backends_gone, timeout_s=10, what="the daemons' connections to close")
    await db.execute("SELECT pg_stat_clear_snapshot()")
    claims = int(await db.fetchval(calls_sql) - calls_before)

    attempts = await _attempts(db, job)
    assert len(attempts) == 600
    ends = sorted(a["ended_at"] for a in attempts)
    run_s = _seconds(enqueued_at, ends[-1])
    assert claims / run_s < 10, f"{claims} claims in {run_s:.1f}s"
    first = ends[0]
    offsets = [_seconds(first, e) for e in ends]
    rates = []
    step = 0.05
    for i in range(int((offsets[-1] - 5) / step) + 1):
        lo = i * step
        n = bisect.bisect_left(offsets, lo + 5) - bisect.bisect_left(offsets, lo)
        rates.append(n / 5)
    assert len(rates) > 400, "a run of about 30 s"
    assert 18 <= min(rates) and max(rates) <= 22, (min(rates), max(rates))
    assert len({a["worker_id"] for a in attempts}) == 3, "all three daemons shared the work"
    await _exactly_once(db, job, 600)


async def test_per_job_rate_holds_while_an_unlimited_job_of_the_kind_runs_at_full_speed(
    db, start
) -> None:
    daemons = [start("--handler", RECORD, "--concurrency", "8", *FAST) for _ in range(2)]
    await _workers(db, 2)

    async def throughput(job: UUID) -> float:
        rows = await _attempts(db, job)
        return len(rows) / _seconds(rows[0]["claimed_at"], max(r["ended_at"] for r in rows))

    alone = await create_job(db, [{"sleep_s": 0.02}] * 600)
    await wait_until(lambda: _all_done(db, alone), timeout_s=60, what="the unlimited job alone")
    limited = await create_job(db, [{"sleep_s": 0.02}] * 40, max_per_second=5)
    beside = await create_job(db, [{"sleep_s": 0.02}] * 600)
    await wait_until(lambda: _all_done(db, beside), timeout_s=60, what="the unlimited job")
    await wait_until(lambda: _all_done(db, limited), timeout_s=60, what="the 5/s job")

    full, shared = await throughput(alone), await throughput(beside)
    # Functional, not a timing race: the job's limit is its own, the unlimited job of the same
    # kind is never held to it (bench/flow_bench.py measures the two throughputs side by side).
    assert shared > 20 * 5 and full > 20 * 5, (shared, full)
    claims = [a["claimed_at"] for a in await _attempts(db, limited)]
    burst = 2  # the default: a third of a second of 5/s, rounded up
    for i, j in itertools.combinations(range(len(claims)), 2):
        assert j - i + 1 <= burst + 5 * _seconds(claims[i], claims[j]) + 1e-6, (i, j)
    rate = (len(claims) - burst) / _seconds(claims[0], claims[-1])
    assert 4.5 <= rate <= 5.5, f"{rate:.2f}/s"
    for daemon in daemons:
        assert await daemon.stop() == 0


async def test_concurrency_key_of_2_shared_by_5_jobs_never_exceeded_and_never_idle(
    db, start
) -> None:
    await db.execute("SELECT chunkd.set_concurrency_limit('tenant-a', 2)")
    await db.execute("SELECT chunkd.set_concurrency_limit('tenant-b', 4)")
    shared = [
        await create_job(db, [{"sleep_s": 0.2}] * 6, concurrency_key="tenant-a") for _ in range(5)
    ]
    other = await create_job(db, [{"sleep_s": 0.2}] * 8, concurrency_key="tenant-b")
    daemons = [start("--handler", RECORD, "--concurrency", "4", *FAST) for _ in range(2)]
    for job in (*shared, other):
        await wait_until(lambda job=job: _all_done(db, job), timeout_s=60, what="every job")

    tenant_a = [a for job in shared for a in await _attempts(db, job)]
    assert len(tenant_a) == 30 and {a["outcome"] for a in tenant_a} == {"completed"}
    assert _peak([(a["claimed_at"], a["ended_at"]) for a in tenant_a]) == 2
    # No slot idles while the key has runnable work: two chunks in flight nearly all the time.
    span = _seconds(min(a["claimed_at"] for a in tenant_a), max(a["ended_at"] for a in tenant_a))
    busy = sum(_seconds(a["claimed_at"], a["ended_at"]) for a in tenant_a)
    assert busy / (2 * span) >= 0.85, f"the key's 2 slots were busy {busy / (2 * span):.0%}"
    # The key's jobs take turns, exactly, across two daemons (each claim picks the key's jobs
    # again under the key's lock): every job's chunk 0, then every job's chunk 1, ...
    in_claim_order = sorted(tenant_a, key=lambda a: (a["claimed_at"], a["seq"]))
    assert [a["seq"] for a in in_claim_order] == sorted(a["seq"] for a in tenant_a)
    # The other key proceeds beside it, up to its own limit.
    tenant_b = await _attempts(db, other)
    assert _peak([(a["claimed_at"], a["ended_at"]) for a in tenant_b]) == 4
    assert max(a["ended_at"] for a in tenant_b) < max(a["ended_at"] for a in tenant_a)
    for daemon in daemons:
        assert await daemon.stop() == 0


async def test_queue_depth_metric_shows_paused_and_throttled_chunks(db, start) -> None:
    await db.execute("SELECT chunkd.pause_kind('held')")
    await db.execute("SELECT chunkd.set_rate_limit('slow', 1, 1)")
    await db.execute("SELECT chunkd.set_concurrency_limit('tenant', 1)")
    await create_job(db, 4, kind="held")
    paused = await create_job(db, 2, kind="other")
    await db.execute("SELECT chunkd.pause_sync_job($1)", paused)
    await create_job(db, 5, kind="slow")
    await create_job(db, 3, kind="other", concurrency_key="tenant")
    await create_job(db, 2, kind="other", max_per_second=0.5)
    await create_job(db, 6, kind="other")
    port = _free_port()
    # The daemon handles none of these kinds: the depth it samples is the whole queue's.
    daemon = start(
        "--handler", RECORD, "--metrics-port", str(port), env={"CHUNKD_METRICS_INTERVAL": "200ms"}
    )
    want = {"pending": 6, "paused": 6, "throttled": 10, "scheduled": 0, "processing": 0}

    async def depth() -> bool:
        samples = await _scrape(port) or {}
        got = {s: _value(samples, "chunkd_queue_depth", status=s) for s in want}
        return got == want

    await wait_until(depth, timeout_s=15, what=f"chunkd_queue_depth {want}")
    assert await daemon.stop() == 0
