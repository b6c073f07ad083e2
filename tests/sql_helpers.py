"""Small wrappers over the public SQL contract, so tests read as the behaviour they check."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg


async def create_job(
    conn: asyncpg.Connection | asyncpg.Pool,
    n: int | list[Any],
    *,
    kind: str = "test",
    max_concurrency: int | None = None,
    max_attempts: int = 3,
    priority: int = 0,
    payload: Any = None,
    max_per_second: float | None = None,
    concurrency_key: str | None = None,
) -> UUID:
    chunks = [{"i": i} for i in range(n)] if isinstance(n, int) else n
    return await conn.fetchval(
        "SELECT chunkd.create_sync_job($1, $2::jsonb, $3::jsonb, $4, $5, $6,"
        " max_per_second => $7, concurrency_key => $8)",
        kind,
        json.dumps(chunks),
        json.dumps(payload if payload is not None else {}),
        max_concurrency,
        max_attempts,
        priority,
        max_per_second,
        concurrency_key,
    )


async def claim(
    conn: asyncpg.Connection | asyncpg.Pool,
    worker: str,
    batch: int = 1,
    *,
    kinds: list[str] | None = None,
    lease: timedelta = timedelta(minutes=10),
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM chunkd.claim_next_chunk_job_safe($1, $2, $3, $4)",
        worker,
        batch,
        kinds,
        lease,
    )


async def claim_or_wait(
    conn: asyncpg.Connection | asyncpg.Pool,
    worker: str,
    batch: int = 1,
    *,
    kinds: list[str] | None = None,
    lease_s: float = 600.0,
    waiting_s: float | None = None,
) -> tuple[list[asyncpg.Record], float | None]:
    """The daemon's claim: the claimed rows, and the wait it was told (None: not throttled)."""
    rows = await conn.fetch(
        "SELECT * FROM chunkd.claim_or_wait($1, $2, $3, $4, $5)",
        worker,
        batch,
        kinds,
        lease_s,
        waiting_s,
    )
    waits = [r["wait_s"] for r in rows if r["id"] is None]
    assert len(waits) <= 1, rows
    return [r for r in rows if r["id"] is not None], (waits[0] if waits else None)


async def complete(
    conn: asyncpg.Connection, queue_id: UUID, worker: str, attempt: int, result: Any = None
) -> bool:
    return await conn.fetchval(
        "SELECT chunkd.complete_chunk_job_safe($1, $2, $3, $4::jsonb)",
        queue_id,
        worker,
        attempt,
        json.dumps(result) if result is not None else None,
    )


async def fail(
    conn: asyncpg.Connection,
    queue_id: UUID,
    worker: str,
    attempt: int,
    error: str = "boom",
    *,
    retryable: bool = True,
    base: timedelta = timedelta(seconds=2),
    cap: timedelta = timedelta(minutes=10),
    retry_in: timedelta | None = None,
) -> str | None:
    return await conn.fetchval(
        "SELECT chunkd.fail_chunk_job_safe($1, $2, $3, $4, $5, $6, $7, $8)",
        queue_id,
        worker,
        attempt,
        error,
        retryable,
        retry_in,
        base,
        cap,
    )


async def queue_row(conn: asyncpg.Connection, queue_id: UUID) -> asyncpg.Record:
    return await conn.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_queue WHERE id = $1", queue_id
    )


async def status_counts(conn: asyncpg.Connection, job_id: UUID) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*)::int AS n FROM chunkd.chunk_processing_queue "
        "WHERE parent_sync_job_id = $1 GROUP BY status",
        job_id,
    )
    return {r["status"]: r["n"] for r in rows}


async def expire_leases(
    conn: asyncpg.Connection, job_id: UUID | None = None, *, queue_ids: list[UUID] | None = None
) -> None:
    """Moves leases into the past, as if the lease time had elapsed without a heartbeat."""
    await conn.execute(
        "UPDATE chunkd.attempts a SET lease_expires_at = now() - interval '1 second' "
        "FROM chunkd.jobs j, chunkd.chunks c WHERE j.id = a.job_id AND c.id = a.chunk_id "
        "AND a.ended_at IS NULL AND ($1::uuid IS NULL OR j.public_id = $1) "
        "AND ($2::uuid[] IS NULL OR c.queue_id = ANY ($2))",
        job_id,
        queue_ids,
    )


async def make_due(conn: asyncpg.Connection, job_id: UUID | None = None) -> None:
    """Scheduled chunks (waiting for a retry) become due now, as if their backoff had passed."""
    await conn.execute(
        "UPDATE chunkd.scheduled s SET run_at = now() FROM chunkd.jobs j "
        "WHERE j.id = s.job_id AND ($1::uuid IS NULL OR j.public_id = $1)",
        job_id,
    )


async def postpone(conn: asyncpg.Connection, job_id: UUID, delay: timedelta) -> None:
    """Moves a job's due chunks into the future (schedules them ``delay`` from now)."""
    await conn.execute(
        "WITH d AS (DELETE FROM chunkd.ready r USING chunkd.jobs j "
        "           WHERE j.id = r.job_id AND j.public_id = $1 RETURNING r.*) "
        "INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims, "
        "                              attempt, run_at, turn) "
        "SELECT chunk_id, job_id, seq, priority, kind, limited, claims, attempt, now() + $2, seq "
        "FROM d",
        job_id,
        delay,
    )
