"""Live work in every state on a database of any released schema version (1 through 8), built
through that version's own public functions: what an upgrade must carry over.

States: pending, a scheduled retry, chunks processing under a live lease and under an expired
one, completed with results, failed with errors, cancelled, a limited job mid-way, a failed
chunk an operator retried; from version 3 an open job and a schedule, from version 5 a delayed
job with a dedupe key, from version 6 a paused job and a rate-limited one.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg

from sql_helpers import claim, complete, fail

OLD_WORKER = "oldhost:4242:abcdef"


async def _job(conn: asyncpg.Connection, n: int, kind: str = "k", **options: Any) -> UUID:
    return await conn.fetchval(
        "SELECT chunkd.create_sync_job($1, $2::jsonb, $3::jsonb, $4, $5)",
        kind,
        json.dumps([{"n": i} for i in range(n)]),
        json.dumps({"job": kind}),
        options.get("max_concurrency"),
        options.get("max_attempts", 3),
    )


async def claim_job(conn: asyncpg.Connection, job: UUID, worker: str, n: int) -> list[Any]:
    """Claims n chunks of one job (its kind is unique in these states)."""
    kind = await conn.fetchval("SELECT kind FROM chunkd.sync_jobs WHERE id = $1", job)
    return await claim(conn, worker, n, kinds=[kind])


async def _expire(conn: asyncpg.Connection, version: int, worker: str) -> None:
    if version == 1:
        await conn.execute(
            "UPDATE chunkd.chunk_processing_queue"
            " SET lease_expires_at = now() - interval '1 minute' WHERE worker_id = $1",
            worker,
        )
    else:
        await conn.execute(
            "UPDATE chunkd.attempts SET lease_expires_at = now() - interval '1 minute'"
            " WHERE worker_id = $1 AND ended_at IS NULL",
            worker,
        )


async def build_live_state(conn: asyncpg.Connection, version: int) -> dict[str, UUID]:
    """Jobs in every state the schema ``version`` the database has knows; returns them by
    state name."""
    jobs = {
        "pending": await _job(conn, 3, "pending"),
        "retrying": await _job(conn, 1, "retrying"),
        "leased": await _job(conn, 2, "leased"),
        "expired": await _job(conn, 1, "expired", max_attempts=2),
        "completed": await _job(conn, 2, "completed"),
        "partial": await _job(conn, 2, "partial", max_attempts=1),
        "cancelled": await _job(conn, 3, "cancelled"),
        "limited": await _job(conn, 3, "limited", max_concurrency=1),
        "retried": await _job(conn, 1, "retried", max_attempts=1),
    }
    (r,) = await claim_job(conn, jobs["retrying"], OLD_WORKER, 1)
    assert await fail(conn, r["queue_id"], OLD_WORKER, 1, "try later", retry_in=timedelta(hours=1))
    await claim_job(conn, jobs["leased"], OLD_WORKER, 2)
    await conn.fetch(
        "SELECT * FROM chunkd.claim_next_chunk_job_safe($1, 1, '{expired}', '1 second')", "dead"
    )
    await _expire(conn, version, "dead")
    for r in await claim_job(conn, jobs["completed"], OLD_WORKER, 2):
        assert await complete(conn, r["queue_id"], OLD_WORKER, 1, {"seq": r["seq"]})
    done, broken = await claim_job(conn, jobs["partial"], OLD_WORKER, 2)
    assert await complete(conn, done["queue_id"], OLD_WORKER, 1, {"ok": True})
    assert await fail(conn, broken["queue_id"], OLD_WORKER, 1, "broken page") == "failed"
    await claim_job(conn, jobs["cancelled"], OLD_WORKER, 1)
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", jobs["cancelled"]) == 3
    (first,) = await claim_job(conn, jobs["limited"], OLD_WORKER, 5)
    assert first["seq"] == 0
    (r,) = await claim_job(conn, jobs["retried"], OLD_WORKER, 1)
    assert await fail(conn, r["queue_id"], OLD_WORKER, 1, "gone", retryable=False) == "failed"
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", jobs["retried"]) == 1
    if version >= 3:
        jobs["open"] = await conn.fetchval(
            "SELECT chunkd.create_sync_job('open', '[{}]', open => true)"
        )
        await conn.execute(
            "SELECT chunkd.create_schedule('nightly', '0 3 * * *', 'planned', '[{}]')"
        )
    if version >= 5:
        jobs["delayed"] = await conn.fetchval(
            "SELECT chunkd.create_sync_job('delayed', '[{}, {}]',"
            " run_at => now() + interval '1 hour', dedupe_key => 'box-1')"
        )
    if version >= 6:
        jobs["paused"] = await _job(conn, 2, "paused")
        assert await conn.fetchval("SELECT chunkd.pause_sync_job($1)", jobs["paused"])
        jobs["throttled"] = await conn.fetchval(
            "SELECT chunkd.create_sync_job('throttled', '[{}, {}, {}]', max_per_second => 0.5,"
            " concurrency_key => 'tenant-1')"
        )
    return jobs
