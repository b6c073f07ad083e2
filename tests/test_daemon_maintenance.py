"""The daemon's maintenance (chunkd.runtime.maintenance): finished jobs move to the history on
its own, one line per round that did something, nothing with --maintenance-interval 0; and
run_once itself, on a real pool."""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import Queue, create_pool
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.maintenance import Maintenance
from daemon_helpers import wait_until
from history_helpers import history_rows, live_rows
from sql_helpers import claim, complete, create_job

RECORD = "test=daemon_handlers:record"


async def _moved(conn, job) -> bool:
    return (await history_rows(conn, job))["jobs"] == 1


async def test_a_running_daemon_moves_finished_jobs_to_the_history(db, start) -> None:
    jobs = [await create_job(db, [{"sleep_s": 0.001}] * 5) for _ in range(3)]
    daemon = start("--handler", RECORD, "--maintenance-interval", "200ms")
    for job in jobs:
        await wait_until(lambda job=job: _moved(db, job), timeout_s=30, what="moved")
        assert await live_rows(db, job) == {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}
        progress = await db.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        assert progress["overall_status"] == "completed" and progress["completed_chunks"] == 5
    assert await daemon.stop() == 0
    rounds = [e for e in daemon.events() if e["event"] == "maintenance.round"]
    assert sum(r["moved_jobs"] for r in rounds) == 3
    assert sum(r["moved_chunks"] for r in rounds) == 15
    assert sum(r["created_partitions"] for r in rounds) == 1
    # Idle rounds (every 200 ms for as long as the test ran) log nothing.
    assert len(rounds) <= 3


async def test_maintenance_interval_0_moves_nothing(db, start) -> None:
    job = await create_job(db, [{"sleep_s": 0.001}] * 2)
    daemon = start("--handler", RECORD, "--maintenance-interval", "0")
    await daemon.wait_for_event("daemon.ready")

    async def finished() -> bool:
        progress = await db.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        return progress["overall_status"] == "completed"

    await wait_until(finished, timeout_s=30, what="the job finished")
    # A round of its own would come within 10 s by default; none comes at all.
    await asyncio.sleep(1.0)
    assert await daemon.stop() == 0
    assert (await live_rows(db, job))["jobs"] == 1
    assert not [e for e in daemon.events() if e["event"].startswith("maintenance")]
    assert daemon.events()[0]["settings"]["maintenance_interval_s"] == 0


async def test_run_once_reports_what_it_did_and_says_when_more_is_left(conn, database) -> None:
    jobs = [await create_job(conn, 3, kind="small") for _ in range(4)]
    for row in await claim(conn, "w1", 12, kinds=["small"]):
        assert await complete(conn, row["queue_id"], "w1", row["attempt"])
    pool = await create_pool(database.dsn, size=2)
    try:
        queue = Queue(pool)
        maintenance = Maintenance(
            queue, DatabaseHealth(queue, worker_id="w"), max_chunks=7, worker_id="w"
        )
        with structlog.testing.capture_logs() as logs:
            first = await maintenance.run_once()
            second = await maintenance.run_once()
            idle = await maintenance.run_once()
    finally:
        await pool.close()
    assert (first.ran, first.moved_jobs, first.moved_chunks, first.more) == (True, 2, 6, True)
    assert (second.moved_jobs, second.moved_chunks, second.more) == (2, 6, False)
    assert not idle.did_something and idle.ran
    rounds = [entry for entry in logs if entry["event"] == "maintenance.round"]
    assert [entry["moved_jobs"] for entry in rounds] == [2, 2]
    for job in jobs:
        assert (await history_rows(conn, job))["jobs"] == 1
