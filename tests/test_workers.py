"""The workers registry: a daemon pruned while it lived registers again, and `chunkd workers`
takes a daemon for dead when the reaper does (issue #21, F3 and F5).
"""

from __future__ import annotations

import asyncio
import json

import asyncpg

from daemon_helpers import run_chunkd, wait_until
from sql_helpers import create_job

ALIVE = "SELECT chunkd.worker_alive($1, 5, 'h', 7, '0.3.0', '{mail}', 4)"


async def _row(conn: asyncpg.Connection, worker: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM chunkd.workers WHERE worker_id = $1", worker)


async def test_a_heartbeat_registers_a_pruned_worker_again(conn) -> None:
    await conn.execute("SELECT chunkd.register_worker('w', 'h', 7, '0.3.0', '{mail}', 4)")
    await conn.execute(ALIVE, "w")
    started = (await _row(conn, "w"))["started_at"]
    # Silent for 16 minutes (a SIGSTOP, a frozen VM, a forward clock step), holding nothing.
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '16 minutes'"
    )
    assert await conn.fetchval("SELECT chunkd.prune_workers(900)") == 1
    assert await _row(conn, "w") is None
    clock = await conn.fetchval(ALIVE, "w")
    row = await _row(conn, "w")
    assert row is not None, "registered again by its heartbeat"
    assert (row["host"], row["pid"], row["version"], row["kinds"], row["concurrency"]) == (
        "h", 7, "0.3.0", ["mail"], 4,
    )  # fmt: skip
    assert row["heartbeat_s"] == 5.0 and row["last_heartbeat_at"] <= clock
    assert row["started_at"] > started  # registered again now
    # A heartbeat of a row that is there changes nothing but the heartbeat.
    await conn.execute("SELECT chunkd.worker_alive('w', 2, 'other', 8, '9', '{x}', 1)")
    again = await _row(conn, "w")
    assert (again["host"], again["kinds"], again["heartbeat_s"]) == ("h", ["mail"], 2.0)
    assert again["started_at"] == row["started_at"]
    # Without its registration (the two-argument call) a missing row stays missing.
    await conn.execute("SELECT chunkd.worker_alive('gone', 5)")
    assert await _row(conn, "gone") is None
    await conn.execute("SELECT chunkd.worker_alive('w', 5)")
    assert (await _row(conn, "w"))["heartbeat_s"] == 5.0


async def test_a_daemon_pruned_while_it_works_is_listed_again(conn, database, start) -> None:
    """Issue #21, F3: a daemon whose row prune_workers deleted (after a +16 min clock step, or
    a 15-minute SIGSTOP) stayed missing from `chunkd workers` and the dashboard while it
    worked: its heartbeat only UPDATEd. Its next heartbeat now registers it again, and it
    goes on claiming."""
    daemon = start("--handler", "test=bad_handlers:echo", "--lease", "3s")  # heartbeat: 1 s
    worker = (await daemon.wait_for_event("daemon.ready"))["worker_id"]
    await wait_until(lambda: _row(conn, worker), timeout_s=10, what="its row")
    async with conn.transaction():  # as the reaper prunes a row silent for 16 minutes
        await conn.execute(
            "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '16 minutes'"
            " WHERE worker_id = $1",
            worker,
        )
        assert await conn.fetchval("SELECT chunkd.prune_workers(900)") == 1
    assert await _row(conn, worker) is None
    await wait_until(lambda: _row(conn, worker), timeout_s=10, what="its next heartbeat")
    listed = await asyncio.to_thread(run_chunkd, "workers", "--json", "--dsn", database.dsn)
    assert [(w["worker_id"], w["state"]) for w in json.loads(listed.stdout)] == [(worker, "live")]
    job = await create_job(conn, 3)
    await wait_until(
        lambda: conn.fetchval(
            "SELECT overall_status = 'completed' FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        ),
        timeout_s=20,
        what="the job",
    )
    assert await daemon.stop() == 0
