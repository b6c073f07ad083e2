"""Creating jobs with the enqueue options of schema version 3 (run_at, dedupe_key, bulk), as an
RPC caller does: named arguments, JSON, values bound."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg


async def enqueue(
    conn: asyncpg.Connection | asyncpg.Pool,
    chunks: list[Any] | int = 1,
    *,
    kind: str = "k",
    run_at: datetime | None = None,
    dedupe_key: str | None = None,
    max_concurrency: int | None = None,
) -> UUID:
    """``create_sync_job`` with named arguments (``run_at``: see :func:`db_time`)."""
    payloads = [{"i": i} for i in range(chunks)] if isinstance(chunks, int) else chunks
    return await conn.fetchval(
        "SELECT chunkd.create_sync_job(kind => $1, chunks => $2::jsonb,"
        " max_concurrency => $3, run_at => $4::timestamptz, dedupe_key => $5)",
        kind,
        json.dumps(payloads),
        max_concurrency,
        run_at,
        dedupe_key,
    )


async def db_time(conn: asyncpg.Connection, offset_s: float = 0.0) -> datetime:
    """The database clock, plus ``offset_s`` seconds (delays are always by this clock)."""
    return await conn.fetchval(
        "SELECT clock_timestamp() + make_interval(secs => $1::float8)", offset_s
    )


async def create_jobs(
    conn: asyncpg.Connection, jobs: list[dict[str, Any]]
) -> list[tuple[UUID, bool]]:
    """``chunkd.create_jobs``: (job id, created) per job, in input order."""
    rows = await conn.fetch(
        "SELECT sync_job_id, created FROM chunkd.create_jobs($1::jsonb) ORDER BY ord",
        json.dumps(jobs, default=str),
    )
    return [(r["sync_job_id"], r["created"]) for r in rows]


async def create_sync_jobs(
    conn: asyncpg.Connection, jobs: list[dict[str, Any]] | str
) -> list[UUID]:
    """The public bulk function; ``jobs`` as objects, or as raw JSON text."""
    text = jobs if isinstance(jobs, str) else json.dumps(jobs, default=str)
    rows = await conn.fetch("SELECT id FROM chunkd.create_sync_jobs($1::jsonb) AS id", text)
    return [r["id"] for r in rows]


async def job_count(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs")


async def overall_status(conn: asyncpg.Connection, job: UUID) -> str:
    return await conn.fetchval(
        "SELECT overall_status FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1",
        job,
    )
