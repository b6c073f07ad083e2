"""Dedupe keys: one unfinished job per (kind, key), under concurrency too (a unique partial
index, not a check-then-insert); the key is free again once its job finished or was cancelled."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from chunkd.db import connect
from enqueue_helpers import create_jobs, enqueue, job_count
from sql_helpers import claim, complete, fail

SESSIONS = 20


async def _finish(conn: asyncpg.Connection, job, *, failing: bool = False) -> None:
    for row in await claim(conn, "w", 100):
        assert row["parent_sync_job_id"] == job
        if failing:
            await fail(conn, row["queue_id"], "w", row["attempt"], "gone", retryable=False)
        else:
            await complete(conn, row["queue_id"], "w", row["attempt"])


async def test_an_unfinished_job_with_the_key_is_returned_not_duplicated(conn) -> None:
    first = await enqueue(conn, 2, kind="mail", dedupe_key="ada@example.com")
    again = await enqueue(conn, 5, kind="mail", dedupe_key="ada@example.com")
    assert again == first
    assert (
        await conn.fetchval("SELECT total_chunks FROM chunkd.sync_jobs WHERE id = $1", first) == 2
    ), "the second call's chunks were not added"
    # The key is per kind, and jobs without a key are never deduplicated.
    other_kind = await enqueue(conn, 1, kind="export", dedupe_key="ada@example.com")
    plain = [await enqueue(conn, 1, kind="mail") for _ in range(2)]
    assert len({first, other_kind, *plain}) == 4
    assert await job_count(conn) == 4
    assert await create_jobs(
        conn, [{"kind": "mail", "chunks": [1], "dedupe_key": "ada@example.com"}]
    ) == [(first, False)]


async def test_the_key_is_free_once_the_job_finished(conn) -> None:
    done = await enqueue(conn, 2, kind="mail", dedupe_key="bob")
    (row,) = await claim(conn, "w", 1)
    await complete(conn, row["queue_id"], "w", 1)
    assert await enqueue(conn, 1, kind="mail", dedupe_key="bob") == done, "one chunk is left"
    await _finish(conn, done)
    assert await conn.fetchval("SELECT finished_at FROM chunkd.sync_jobs WHERE id = $1", done)
    second = await enqueue(conn, 1, kind="mail", dedupe_key="bob")
    assert second != done
    # A job that finished with failures (partial_failure) frees its key too.
    await _finish(conn, second, failing=True)
    third = await enqueue(conn, 1, kind="mail", dedupe_key="bob")
    assert third not in (done, second)
    assert await job_count(conn) == 3


async def test_the_key_is_free_once_the_job_is_cancelled(conn) -> None:
    job = await enqueue(conn, 3, kind="mail", dedupe_key="carol")
    await claim(conn, "w", 1)  # one chunk in flight, cancelled with the rest
    assert await conn.fetchval("SELECT chunkd.cancel_sync_job($1)", job) == 3
    assert await enqueue(conn, 1, kind="mail", dedupe_key="carol") != job
    assert await job_count(conn) == 2


async def test_twenty_sessions_racing_on_one_key_create_exactly_one_job(database, conn) -> None:
    """Twenty producers press "sync" at once: each in its own transaction, released together,
    each holding its transaction open a moment after its call so the calls overlap."""
    sessions = [await connect(database.dsn) for _ in range(SESSIONS)]
    barrier = asyncio.Barrier(SESSIONS)

    async def produce(session: asyncpg.Connection) -> tuple[object, bool]:
        async with session.transaction():
            await barrier.wait()
            row = await session.fetchrow(
                "SELECT sync_job_id, created FROM chunkd.create_jobs($1::jsonb)",
                json.dumps([{"kind": "mail", "chunks": [1, 2], "dedupe_key": "inbox-42"}]),
            )
            await asyncio.sleep(0.05)  # overlap: commit after the others have called
        return row["sync_job_id"], row["created"]

    try:
        results = await asyncio.gather(*(produce(s) for s in sessions))
    finally:
        for s in sessions:
            await s.close()
    assert len({job for job, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * (SESSIONS - 1) + [True]
    assert await job_count(conn) == 1
    assert await conn.fetchval("SELECT count(*) FROM chunkd.chunk_processing_queue") == 2


async def test_twenty_autocommit_calls_of_create_sync_job_with_one_key(database, conn) -> None:
    pool = await asyncpg.create_pool(database.dsn, min_size=SESSIONS, max_size=SESSIONS)
    try:
        barrier = asyncio.Barrier(SESSIONS)

        async def produce() -> object:
            async with pool.acquire() as session:
                await barrier.wait()
                return await enqueue(session, 1, kind="mail", dedupe_key="inbox-7")

        ids = await asyncio.gather(*(produce() for _ in range(SESSIONS)))
    finally:
        await pool.close()
    assert len(set(ids)) == 1
    assert await job_count(conn) == 1


async def test_bulk_calls_racing_on_keys_in_opposite_orders_do_not_deadlock(database, conn) -> None:
    keys = [f"box-{i}" for i in range(5)]
    sessions = [await connect(database.dsn) for _ in range(2)]
    barrier = asyncio.Barrier(2)

    async def produce(session: asyncpg.Connection, order: list[str]) -> dict[str, object]:
        async with session.transaction():
            await barrier.wait()
            rows = await create_jobs(
                session, [{"kind": "mail", "chunks": [k], "dedupe_key": k} for k in order]
            )
            await asyncio.sleep(0.05)
        return {k: job for k, (job, _) in zip(order, rows, strict=True)}

    try:
        forward, backward = await asyncio.gather(
            produce(sessions[0], keys), produce(sessions[1], keys[::-1])
        )
    finally:
        for s in sessions:
            await s.close()
    assert forward == backward
    assert await job_count(conn) == len(keys)


async def test_a_key_twice_in_one_bulk_call_is_one_job(conn) -> None:
    rows = await create_jobs(
        conn,
        [
            {"kind": "mail", "chunks": [1], "dedupe_key": "dup"},
            {"kind": "mail", "chunks": [2]},
            {"kind": "mail", "chunks": [3], "dedupe_key": "dup"},
        ],
    )
    assert [created for _, created in rows] == [True, True, False]
    assert rows[2][0] == rows[0][0] != rows[1][0]
    assert await job_count(conn) == 2


async def test_retrying_a_finished_job_takes_its_key_back_unless_another_holds_it(conn) -> None:
    job = await enqueue(conn, 1, kind="mail", dedupe_key="dan")
    await _finish(conn, job, failing=True)
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    assert await enqueue(conn, 1, kind="mail", dedupe_key="dan") == job, "unfinished again"
    await _finish(conn, job, failing=True)

    newer = await enqueue(conn, 1, kind="mail", dedupe_key="dan")
    assert newer != job
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError) as refused:
        await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job)
    assert str(refused.value) == (
        f"chunkd: sync job {job} cannot be retried while job {newer} with the same dedupe key"
        ' "dan" is unfinished'
    )
    counts = await conn.fetchrow(
        "SELECT failed_chunks, finished_at FROM chunkd.chunk_processing_status"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    assert counts["failed_chunks"] == 1 and counts["finished_at"] is not None, "unchanged"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "chunkd: dedupe_key must not be empty (NULL: no key)"),
        ("k" * 257, "chunkd: dedupe_key must be at most 256 characters, got 257"),
    ],
    ids=["empty", "too-long"],
)
async def test_a_bad_key_is_refused_and_writes_nothing(conn, key: str, message: str) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError) as refused:
        await enqueue(conn, 1, dedupe_key=key)
    assert str(refused.value) == message
    assert await job_count(conn) == 0
