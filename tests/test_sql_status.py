"""Progress view and function, NOTIFY, create_sync_job validation, grants, the seed's checks."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from chunkd.db import connect
from sql_helpers import claim, complete, create_job, fail


async def _status(conn: asyncpg.Connection, job) -> asyncpg.Record:
    return await conn.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1", job
    )


async def test_status_for_every_mix_of_states(conn) -> None:
    pending = await create_job(conn, 4)
    s = await _status(conn, pending)
    assert (s["total_chunks"], s["pending_chunks"], s["overall_status"]) == (4, 4, "pending")
    assert s["progress_percentage"] == Decimal("0.00")

    processing = await create_job(conn, 3, priority=9)
    rows = await claim(conn, "w", 2)
    assert {r["parent_sync_job_id"] for r in rows} == {processing}
    await complete(conn, rows[0]["queue_id"], "w", 1)
    s = await _status(conn, processing)
    assert s["overall_status"] == "processing"
    assert (s["pending_chunks"], s["processing_chunks"], s["completed_chunks"]) == (1, 1, 1)
    assert s["progress_percentage"] == Decimal("33.33")

    completed = await create_job(conn, 2, priority=20)
    for r in await claim(conn, "w", 2):
        await complete(conn, r["queue_id"], "w", 1)
    s = await _status(conn, completed)
    assert s["overall_status"] == "completed" and s["progress_percentage"] == Decimal("100.00")
    assert s["finished_at"] is not None

    partial = await create_job(conn, 2, priority=30)
    a, b = await claim(conn, "w", 2)
    await complete(conn, a["queue_id"], "w", 1)
    await fail(conn, b["queue_id"], "w", 1, "nope", retryable=False)
    s = await _status(conn, partial)
    assert (s["completed_chunks"], s["failed_chunks"]) == (1, 1)
    assert s["overall_status"] == "partial_failure"

    cancelled = await create_job(conn, 5, priority=40)
    (c,) = await claim(conn, "w", 1)
    await complete(conn, c["queue_id"], "w", 1)
    await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", cancelled)
    s = await _status(conn, cancelled)
    assert (s["completed_chunks"], s["cancelled_chunks"]) == (1, 4)
    assert s["overall_status"] == "cancelled" and s["progress_percentage"] == Decimal("100.00")

    # A job whose chunk is waiting for a retry has started: it is processing, not pending.
    retrying = await create_job(conn, 1, priority=50)
    (r,) = await claim(conn, "w", 1)
    await fail(conn, r["queue_id"], "w", 1, retry_in=timedelta(hours=1))
    assert (await _status(conn, retrying))["overall_status"] == "processing"


async def test_get_sync_job_progress_keys_counts_and_eta(conn) -> None:
    job = await create_job(conn, 10, kind="mail")
    rows = await claim(conn, "w", 4)
    for r in rows[:3]:
        await complete(conn, r["queue_id"], "w", 1)
    p = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert set(p) == {
        "sync_job_id", "kind", "total_chunks", "pending_chunks", "processing_chunks",
        "completed_chunks", "failed_chunks", "cancelled_chunks", "overall_status",
        "progress_percentage", "created_at", "started_at", "finished_at", "run_at",
        "chunks_per_second", "eta_seconds",
        # Schema version 3: growing jobs.
        "open", "total_is_final", "appended_chunks", "on_finish_kind",
        # Schema version 15: job labels.
        "label",
    }  # fmt: skip
    assert p["sync_job_id"] == str(job) and p["kind"] == "mail"
    assert p["run_at"] is None  # not delayed
    assert (p["open"], p["total_is_final"], p["appended_chunks"]) == (False, True, 0)
    assert (p["total_chunks"], p["pending_chunks"], p["processing_chunks"]) == (10, 6, 1)
    assert (p["completed_chunks"], p["overall_status"]) == (3, "processing")
    assert p["progress_percentage"] == 30.0
    assert p["started_at"] is not None and p["finished_at"] is None
    assert p["chunks_per_second"] > 0
    assert p["eta_seconds"] == pytest.approx(7 / p["chunks_per_second"], rel=0.05, abs=0.1)
    for r in await claim(conn, "w", 10):
        await complete(conn, r["queue_id"], "w", 1)
    await complete(conn, rows[3]["queue_id"], "w", 1)
    p = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert p["overall_status"] == "completed" and p["eta_seconds"] == 0
    assert p["finished_at"] is not None
    unknown = "00000000-0000-0000-0000-000000000000"
    assert await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", unknown) is None


async def _listen(dsn: str) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    listener = await connect(dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("chunkd", lambda *args: received.put_nowait(args[3]))
    return listener, received


async def _drain(received: asyncio.Queue[str], settle_s: float = 0.3) -> list[str]:
    await asyncio.sleep(settle_s)
    out = []
    while not received.empty():
        out.append(received.get_nowait())
    return out


async def test_one_notification_for_a_thousand_chunk_job(database, conn) -> None:
    listener, received = await _listen(database.dsn)
    try:
        await create_job(conn, 1000)
        notes = await _drain(received)
        assert len(notes) == 1
        assert float(notes[0]) == 0, "payload: due now"
        # Claims and unlimited completions make nothing newly runnable: no notification.
        for r in await claim(conn, "w", 5):
            await complete(conn, r["queue_id"], "w", 1)
        assert await _drain(received) == []
    finally:
        await listener.close()


async def test_notification_when_limited_chunk_completes_and_on_retry(database, conn) -> None:
    await create_job(conn, 3, max_concurrency=1)
    listener, received = await _listen(database.dsn)
    try:
        (r,) = await claim(conn, "w", 1)
        assert await _drain(received) == []
        await complete(conn, r["queue_id"], "w", 1)
        assert len(await _drain(received)) == 1
        (r,) = await claim(conn, "w", 1)
        await fail(conn, r["queue_id"], "w", 1, retry_in=timedelta(seconds=30))
        notes = sorted(float(n) for n in await _drain(received))
        # The failed chunk freed a slot of the limited job (due now: 0), and its retry is due in
        # 30 s: the payload is the delay, for the daemon's timer.
        assert len(notes) == 2 and notes[0] == 0
        assert 29 < notes[1] <= 30, "payload: seconds until the retry is due"
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ("[]", "must not be empty"),
        ('{"a": 1}', "must be a JSON array"),
        ('"text"', "must be a JSON array"),
        ("null", "must be a JSON array"),
    ],
)
async def test_create_sync_job_rejects_bad_chunks_and_inserts_nothing(
    conn, chunks, message
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await conn.fetchval("SELECT chunkd.create_sync_job('k', $1::jsonb)", chunks)
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


async def test_create_sync_job_rejects_non_json_text(conn) -> None:
    with pytest.raises(asyncpg.InvalidTextRepresentationError, match="json"):
        await conn.fetchval("SELECT chunkd.create_sync_job('k', $1::text::jsonb)", "[1, 2")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="kind"):
        await conn.fetchval("SELECT chunkd.create_sync_job('', '[1]')")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="max_concurrency"):
        await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1]', '{}', 0)")
    assert await conn.fetchval("SELECT count(*) FROM chunkd.chunk_processing_queue") == 0


async def test_create_sync_job_named_arguments_as_an_rpc_caller_sends_them(conn) -> None:
    job = await conn.fetchval(
        "SELECT chunkd.create_sync_job(kind => 'mail', chunks => $1::jsonb, priority => 3,"
        " max_concurrency => 2)",
        json.dumps([{"page": 1}, {"page": 2}]),
    )
    row = await conn.fetchrow("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job)
    assert (row["kind"], row["priority"], row["max_concurrency"], row["total_chunks"]) == (
        "mail", 3, 2, 2,
    )  # fmt: skip
    seqs = await conn.fetch(
        "SELECT seq, payload FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1 ORDER BY seq",
        job,
    )
    assert [(s["seq"], s["payload"]) for s in seqs] == [(0, {"page": 1}), (1, {"page": 2})]


async def test_seed_verification_queries_run_verbatim_once_qualified(conn) -> None:
    job = await create_job(conn, 3)
    await claim(conn, "w", 1)
    rows = await conn.fetch(
        "SELECT * FROM chunkd.chunk_processing_queue ORDER BY created_at DESC LIMIT 10"
    )
    assert len(rows) == 3
    status = await conn.fetch("SELECT * FROM chunkd.chunk_processing_status")
    assert status[0]["overall_status"] == "processing"
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 0
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["total_chunks"] == 3


async def test_schema_grants_nothing_to_public(conn) -> None:
    role = "chunkd_test_nobody"
    await conn.execute(f"DROP ROLE IF EXISTS {role}")
    await conn.execute(f"CREATE ROLE {role}")
    try:
        checks = await conn.fetchrow(
            f"""SELECT has_schema_privilege('{role}', 'chunkd', 'USAGE') AS usage,
                       has_table_privilege('{role}', 'chunkd.chunk_processing_queue',
                                           'SELECT') AS sel,
                       has_function_privilege('{role}',
                         'chunkd.create_sync_job(text,jsonb,jsonb,integer,integer,integer,'
                         'timestamptz,text,boolean,text,numeric,text,text)',
                         'EXECUTE') AS exec"""
        )
        assert dict(checks) == {"usage": False, "sel": False, "exec": False}
        acl_public = await conn.fetchval(
            """SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
               WHERE n.nspname = 'chunkd'
                 AND (p.proacl IS NULL
                      OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))"""
        )
        assert acl_public == 0
    finally:
        await conn.execute(f"DROP ROLE {role}")
