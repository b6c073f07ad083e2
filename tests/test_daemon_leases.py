"""A handler stops when its daemon can no longer show that it holds the chunk's lease.

Real ``chunkd run`` subprocesses; ``fault_handlers.steps`` records each execution with the
database clock, including when a cancelled one really stopped.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime

import asyncpg
import pytest

from daemon_helpers import wait_until
from delay_proxy import DelayProxy
from fault_handlers import EXECUTIONS_DDL
from sql_helpers import create_job, status_counts

STEPS = "test=fault_handlers:steps"


@pytest.fixture
async def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """Overrides conftest's: the table of ``fault_handlers``, not of ``daemon_handlers``."""
    await conn.execute(EXECUTIONS_DDL)
    return conn


async def _completed(conn: asyncpg.Connection, job, n: int) -> bool:
    return await status_counts(conn, job) == {"completed": n}


def _overlap_s(a: asyncpg.Record, b: asyncpg.Record, since: datetime) -> float:
    start = max(a["started_at"], b["started_at"], since)
    end = min(a["ended_at"], b["ended_at"])
    return max(0.0, (end - start).total_seconds())


async def test_a_stalled_daemon_cancels_its_handler_on_resuming(db, start) -> None:
    # Chunks of 3 s (30 steps of 0.1 s), one at a time; leases of 2 s.
    job = await create_job(db, [{"steps": 30, "step_s": 0.1}] * 3, max_concurrency=1)
    args = ["--handler", STEPS, "--lease", "2s", "--reap-interval", "200ms"]
    daemons = [start(*args), start(*args)]
    first = await wait_until(
        lambda: db.fetchrow("SELECT * FROM public.fault_executions WHERE seq = 0"),
        timeout_s=20,
        what="chunk 0 to start",
        interval_s=0.01,
    )
    (stalled,) = [d for d in daemons if d.pid == first["pid"]]
    (other,) = [d for d in daemons if d is not stalled]
    stalled.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(5)  # the input: stopped for 5 s, past its 2 s lease
    finally:
        stalled.signal(signal.SIGCONT)
    resumed_at = await db.fetchval("SELECT clock_timestamp()")
    await wait_until(lambda: _completed(db, job, 3), timeout_s=30, what="the job")

    async def stamped() -> asyncpg.Record | None:
        return await db.fetchrow(
            "SELECT * FROM public.fault_executions WHERE id = $1 AND ended_at IS NOT NULL",
            first["id"],
        )

    stale = await wait_until(stamped, timeout_s=10, what="the stalled handler's end")
    assert stale["cancelled"], "the stalled handler was cancelled, not run to its end"
    assert (stale["ended_at"] - resumed_at).total_seconds() < 1.0
    executions = await db.fetch(
        "SELECT * FROM public.fault_executions WHERE id <> $1 AND ended_at IS NOT NULL", first["id"]
    )
    # After SIGCONT the stalled copy and the other daemon's chunks never ran side by side
    # (before the fix: for over 2 s, although the job allows one chunk at a time).
    assert sum(_overlap_s(stale, e, resumed_at) for e in executions) < 0.5
    assert other.pid in {e["pid"] for e in executions}, "the other daemon took chunk 0 over"
    completed = await db.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE sync_job_id = $1 AND event = 'completed'",
        job,
    )
    assert completed == 3
    events = stalled.events()
    lost = [e for e in events if e["event"] == "chunk.lease_lost"]
    assert [(e["seq"], e["action"]) for e in lost] == [(0, "handler cancelled")]
    stalls = [e for e in events if e["event"] == "event_loop.stalled"]
    assert len(stalls) == 1 and 4.5 <= stalls[0]["stalled_s"] <= 7, stalls
    for daemon in daemons:
        assert await daemon.stop() == 0


async def test_a_handler_is_cancelled_by_its_lease_end_when_renewals_go_unanswered(
    db, database, start
) -> None:
    proxy = await DelayProxy(database.dsn, delay_s=0.0).start()
    try:
        job = await create_job(db, [{"steps": 100, "step_s": 0.1}])
        daemon = start("--handler", STEPS, "--lease", "2s", "--reap-interval", "200ms",
                       dsn=proxy.dsn(), env={"FAULT_DSN": database.dsn})  # fmt: skip
        await wait_until(
            lambda: db.fetchrow("SELECT * FROM public.fault_executions"),
            timeout_s=20,
            what="the handler to start",
        )
        # From now on no reply comes back within a lease: renewals still reach the server,
        # but the daemon can no longer show that it holds the chunk.
        proxy.delay_s = 4.0
        silenced_at = await db.fetchval("SELECT clock_timestamp()")

        async def stamped() -> asyncpg.Record | None:
            return await db.fetchrow(
                "SELECT * FROM public.fault_executions WHERE attempt = 1 AND ended_at IS NOT NULL"
            )

        first = await wait_until(stamped, timeout_s=15, what="the handler to stop")
        assert first["cancelled"]
        # No later than the lease's end, measured from the last renewal that came back.
        assert (first["ended_at"] - silenced_at).total_seconds() < 2.0 + 0.5
        lost = [e for e in daemon.events() if e["event"] == "chunk.lease_lost"]
        assert lost and lost[0]["action"] == "handler cancelled"
        # Whichever ran out first: the claim's lease, or the registry's three heartbeats (the
        # reaper takes a silent daemon for dead then): both from the last answer that came back.
        assert (
            "lease ran out" in lost[0]["reason"] or "no heartbeat reached" in lost[0]["reason"]
        ), lost[0]
        proxy.delay_s = 0.0
        # Back to normal: the chunk is reaped and runs again, to its end this time.
        await wait_until(lambda: _completed(db, job, 1), timeout_s=40, what="the chunk")
        ran = await db.fetchval(
            "SELECT count(*) FROM public.fault_executions"
            " WHERE NOT cancelled AND ended_at IS NOT NULL"
        )
        assert ran == 1
        assert await daemon.stop() == 0
    finally:
        await proxy.close()


async def test_a_handler_of_a_cancelled_job_is_cancelled_at_the_next_heartbeat(db, start) -> None:
    job = await create_job(db, [{"steps": 100, "step_s": 0.1}])
    daemon = start("--handler", STEPS, "--lease", "1500ms")
    await wait_until(
        lambda: db.fetchrow("SELECT * FROM public.fault_executions"),
        timeout_s=20,
        what="the handler",
    )
    assert await db.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 1
    cancelled_at = await db.fetchval("SELECT clock_timestamp()")

    async def stamped() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM public.fault_executions WHERE ended_at IS NOT NULL")

    stopped = await wait_until(stamped, timeout_s=10, what="the handler to stop")
    assert stopped["cancelled"]
    # Heartbeats run every lease/3 = 0.5 s.
    assert (stopped["ended_at"] - cancelled_at).total_seconds() < 0.5 + 0.5
    (lost,) = [e for e in daemon.events() if e["event"] == "chunk.lease_lost"]
    assert "no longer lists this claim" in lost["reason"]
    assert await status_counts(db, job) == {"cancelled": 1}
    assert daemon.process.poll() is None, "the daemon carries on"
    assert await daemon.stop() == 0


async def test_a_worker_whose_handler_was_cancelled_runs_the_next_chunk_to_its_end(
    db, start
) -> None:
    """Workers are long-lived tasks: the cancellation of one chunk's handler (its job was
    cancelled) must end that handler alone. With one slot, the same worker then runs another
    job's chunk, and a chunk timed out after it, each to its own outcome; the slot a cancelled
    handler frees is filled at once, not at the next poll."""
    doomed = await create_job(db, [{"steps": 100, "step_s": 0.1}])
    daemon = start(
        "--handler", STEPS, "--lease", "1500ms", "--concurrency", "1", "--chunk-timeout", "2s",
        "--retry-base", "100ms", "--retry-cap", "100ms", "--poll-interval", "60s",
    )  # fmt: skip
    await wait_until(
        lambda: db.fetchrow("SELECT * FROM public.fault_executions"),
        timeout_s=20,
        what="the doomed handler",
    )
    later = await create_job(db, [{"steps": 5, "step_s": 0.1}] * 2, kind="test")
    assert await db.fetchval("SELECT chunkd.cancel_sync_job($1)", doomed) == 1
    await wait_until(lambda: _completed(db, later, 2), timeout_s=20, what="the next job")
    slow = await create_job(db, [{"steps": 40, "step_s": 0.1}], max_attempts=1)
    await wait_until(
        lambda: db.fetchval(
            "SELECT overall_status = 'partial_failure' FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            slow,
        ),
        timeout_s=20,
        what="the slow chunk to time out",
    )
    last = await create_job(db, [{"steps": 2, "step_s": 0.1}])
    await wait_until(lambda: _completed(db, last, 1), timeout_s=20, what="a chunk after it")
    runs = await db.fetch("SELECT cancelled, pid FROM public.fault_executions ORDER BY started_at")
    assert [r["cancelled"] for r in runs] == [True, False, False, True, False], runs
    assert len({r["pid"] for r in runs}) == 1
    assert await daemon.stop() == 0
