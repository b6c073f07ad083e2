"""Upgrading a live database from schema version 1 to version 2 loses nothing.

The version 1 state is built from the version 1 migration file alone, through its own functions,
with jobs in every state: pending, a scheduled retry, chunks processing under a live lease and
under an expired one, completed with results, failed with errors, cancelled, a limited job
mid-way, and a failed chunk an operator retried. After ``chunkd migrate`` every chunk reads
as before, the version 1 audit rows are all there, and the queue behaves: pending is
claimable, the version 1 holder's completion is accepted and a stale one refused, the expired
lease is reaped, the retry waits for its time.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from sql_helpers import claim, complete, fail
from upgrade_state import OLD_WORKER as V1_WORKER
from upgrade_state import build_live_state


async def _install_v1(conn: asyncpg.Connection) -> None:
    assert (await apply_migrations(conn, up_to=1)).versions == [1]


CHUNK_COLUMNS = (
    "id, chunk_id, parent_sync_job_id, status, attempts, max_attempts, created_at, started_at,"
    " completed_at, error_message, worker_id, lease_expires_at, result, seq, kind"
)


async def _chunks(conn: asyncpg.Connection) -> dict[UUID, dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {CHUNK_COLUMNS}, run_at, now() AS read_at FROM chunkd.chunk_processing_queue"  # noqa: S608
    )
    return {r["id"]: dict(r) for r in rows}


async def _statuses(conn: asyncpg.Connection) -> dict[UUID, dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM chunkd.chunk_processing_status")
    return {r["parent_sync_job_id"]: dict(r) for r in rows}


async def _events(conn: asyncpg.Connection) -> Counter[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT queue_id, sync_job_id, event, status, attempt, worker_id, error, at"
        " FROM chunkd.chunk_events"
    )
    return Counter(tuple(r) for r in rows)


def _same_chunk(before: dict[str, Any], after: dict[str, Any], upgraded_at: datetime) -> None:
    for column in CHUNK_COLUMNS.replace(" ", "").split(","):
        assert after[column] == before[column], (column, before, after)
    if before["status"] == "pending":
        if before["run_at"] > upgraded_at:  # a retry's backoff keeps its time
            assert after["run_at"] == before["run_at"]
        else:  # due then, due now
            assert after["run_at"] <= after["read_at"]


async def test_live_v1_database_upgrades_to_v2_with_nothing_lost(empty_database: str) -> None:
    conn = await connect(empty_database)
    try:
        await _install_v1(conn)
        jobs = await build_live_state(conn, 1)
        chunks_before = await _chunks(conn)
        statuses_before = await _statuses(conn)
        events_before = await _events(conn)
        assert len(chunks_before) == 18
        assert {c["status"] for c in chunks_before.values()} == {
            "pending",
            "processing",
            "completed",
            "failed",
            "cancelled",
        }

        assert (await apply_migrations(conn)).versions == [m.version for m in migrations()][1:]
        upgraded_at = await conn.fetchval("SELECT now()")

        chunks_after = await _chunks(conn)
        assert chunks_after.keys() == chunks_before.keys()
        for queue_id, before in chunks_before.items():
            _same_chunk(before, chunks_after[queue_id], upgraded_at)
        statuses_after = await _statuses(conn)
        # Version 1 called a job whose failed chunks an operator had retried "pending" again
        # (its attempts were reset); version 2 says what happened: it started, and runs again.
        assert statuses_before[jobs["retried"]]["overall_status"] == "pending"
        statuses_before[jobs["retried"]]["overall_status"] = "processing"
        for job, before in statuses_before.items():
            after = statuses_after[job]
            for key in (
                "kind",
                "total_chunks",
                "pending_chunks",
                "processing_chunks",
                "completed_chunks",
                "failed_chunks",
                "cancelled_chunks",
                "overall_status",
                "progress_percentage",
                "created_at",
                "started_at",
            ):
                assert after[key] == before[key], (key, before, after)
        assert statuses_after[jobs["completed"]]["finished_at"] is not None
        assert await _events(conn) == events_before, "the version 1 audit rows are all kept"

        await _behaves_after_upgrade(conn, jobs, chunks_before)
    finally:
        await conn.close()
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chunkd.cli", "migrate", "--check", "--dsn", empty_database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await check.communicate()
    assert check.returncode == 0, err.decode()
    assert f"current (version {migrations()[-1].version})" in out.decode()


async def _behaves_after_upgrade(
    conn: asyncpg.Connection, jobs: dict[str, UUID], before: dict[UUID, dict[str, Any]]
) -> None:
    leased = [c for c in before.values() if c["parent_sync_job_id"] == jobs["leased"]]
    one, two = sorted(leased, key=lambda c: c["seq"])
    # The version 1 holder's outcome is accepted, through the batch function a 0.1 daemon calls;
    # stale ones (another worker, another attempt) are refused, as before.
    assert not await complete(conn, one["id"], "someone-else", 1)
    assert not await complete(conn, one["id"], V1_WORKER, 2)
    accepted = await conn.fetch(
        "SELECT chunkd.complete_chunks($1, $2, $3, $4)",
        V1_WORKER,
        [one["id"]],
        [1],
        [json.dumps({"v1": "daemon"})],
    )
    assert [r[0] for r in accepted] == [one["id"]]
    assert await fail(conn, two["id"], V1_WORKER, 1, "late") == "pending"
    assert not await complete(conn, one["id"], V1_WORKER, 1), "a completion is accepted once"

    # The expired lease is reaped; the retry waits for its time; pending is claimable; the
    # limited job still runs one chunk at a time, in order.
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
    claimed = await claim(conn, "v2", 100)
    by_job = Counter(r["parent_sync_job_id"] for r in claimed)
    assert by_job == {jobs["pending"]: 3, jobs["expired"]: 1, jobs["retried"]: 1}
    assert all(r["attempt"] == 1 for r in claimed if r["parent_sync_job_id"] != jobs["expired"])
    assert [r["attempt"] for r in claimed if r["parent_sync_job_id"] == jobs["expired"]] == [2]
    limited_first = next(
        c for c in before.values() if c["parent_sync_job_id"] == jobs["limited"] and c["seq"] == 0
    )
    assert await complete(conn, limited_first["id"], V1_WORKER, 1)
    (nxt,) = await claim(conn, "v2", 100, kinds=["limited"])
    assert nxt["seq"] == 1
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", jobs["completed"])
    assert progress["overall_status"] == "completed" and progress["completed_chunks"] == 2
