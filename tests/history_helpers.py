"""Helpers for the retention tests: every read a job has (views, functions, the CLI's and the
dashboard's statements), as one comparable snapshot; maintenance rounds; the history's rows."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from chunkd.db.sql_files import queries

# The statements of the CLI and the dashboard that read one job ($1), with their other arguments.
_OPS = ("ops_job_progress", "ops_job_settings", "ops_job_state")
_WEB = {
    "web_job_progress": (),
    "web_job_settings": (),
    "web_job_flow": (),
    "web_job_events": (100,),
    "web_chunk_map": (),
    "web_job_errors": (100,),
    "web_job_throughput": (1.0, datetime(2000, 1, 1, tzinfo=UTC)),
}


def _rows(records: list[asyncpg.Record]) -> list[str]:
    """Rows as sorted text: the order of a view's rows is not part of what it shows."""
    return sorted(json.dumps(dict(r), default=str, sort_keys=True) for r in records)


async def job_reads(conn: asyncpg.Connection, job: UUID) -> dict[str, Any]:
    """What every reader sees of ``job``: the seed's views, the audit trail, the functions, the
    statements of ``chunkd status`` and of the dashboard's job page."""
    q = queries()
    web = queries("web.sql")
    job_kind, job_status = await conn.fetchrow(
        "SELECT kind, overall_status FROM chunkd.chunk_processing_status"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    reads: dict[str, Any] = {
        "sync_jobs": _rows(await conn.fetch("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job)),
        "chunked_sync_jobs": _rows(
            await conn.fetch("SELECT * FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1", job)
        ),
        "chunk_processing_queue": _rows(
            await conn.fetch(
                "SELECT * FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
            )
        ),
        "chunk_processing_status": _rows(
            await conn.fetch(
                "SELECT * FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1", job
            )
        ),
        "chunk_events": _rows(
            await conn.fetch("SELECT * FROM chunkd.chunk_events WHERE sync_job_id = $1", job)
        ),
        "job_events": _rows(
            await conn.fetch("SELECT * FROM chunkd.job_events WHERE sync_job_id = $1", job)
        ),
        "job_flow": _rows([r for r in await conn.fetch("SELECT * FROM chunkd.job_flow($1)", job)]),
        "page": _rows(
            [
                r
                for r in await conn.fetch(
                    "SELECT * FROM chunkd.sync_jobs_page(NULL, NULL, 10000, 0)"
                )
                if r["parent_sync_job_id"] == job
            ]
        ),
        # The dashboard's jobs page: with no search, its id's start, its kind's, of its status.
        "search": [
            _rows(
                [
                    r
                    for r in await conn.fetch(
                        "SELECT * FROM chunkd.search_sync_jobs($1, $2, $3, 10000, 0)", *args
                    )
                    if r["parent_sync_job_id"] == job
                ]
            )
            for args in (
                (None, None, None),
                (str(job)[:8], None, None),
                (str(job).replace("-", "")[:13], None, None),
                (job_kind.upper(), job_kind, job_status),
            )
        ],
        "recent_errors": _rows(await conn.fetch(q["ops_recent_errors"], job, 100)),
        "status_rows": _rows(await conn.fetch(q["ops_job_status_rows"], [job])),
    }
    for name in _OPS:
        reads[name] = _rows(await conn.fetch(q[name], job))
    for name, args in _WEB.items():
        reads[name] = _rows(await conn.fetch(web[name], job, *args))
    chunk_events = await conn.fetch(
        "SELECT q.seq, q.id FROM chunkd.chunk_processing_queue q WHERE q.parent_sync_job_id = $1",
        job,
    )
    for row in chunk_events:
        reads[f"chunk {row['seq']}"] = _rows(await conn.fetch(web["web_chunk"], job, row["seq"]))
        reads[f"chunk {row['seq']} events"] = _rows(
            await conn.fetch(web["web_chunk_events"], job, row["seq"])
        )
        reads[f"chunk {row['seq']} events by queue id"] = _rows(
            await conn.fetch("SELECT * FROM chunkd.chunk_events WHERE queue_id = $1", row["id"])
        )
        reads[f"chunk {row['seq']} payload"] = _rows(
            await conn.fetch(web["web_chunk_payload"], job, row["seq"])
        )
    return reads


async def run_round(conn: asyncpg.Connection, max_chunks: int = 5000) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        "SELECT * FROM chunkd.retention_round($1)", max_chunks
    )
    return row


async def rounds_until_idle(conn: asyncpg.Connection, max_chunks: int = 5000) -> int:
    """Runs rounds until one says there is nothing more to do; returns the jobs moved."""
    moved = 0
    for _ in range(1000):
        row = await run_round(conn, max_chunks)
        moved += row["moved_jobs"]
        if not row["more"]:
            return moved
    raise AssertionError("maintenance rounds never ran out of work")


async def wait_for_round(conn: asyncpg.Connection, condition: str, timeout_s: float = 20.0) -> None:
    """Runs rounds until ``condition`` (a SQL boolean expression) holds, or fails at the
    deadline: for expiries, which take the database clock's own time."""
    deadline = time.monotonic() + timeout_s
    while True:
        await run_round(conn)
        if await conn.fetchval(f"SELECT {condition}"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {condition}")
        await asyncio.sleep(0.2)


async def history_rows(conn: asyncpg.Connection, job: UUID) -> dict[str, int]:
    """How many rows of ``job`` each history table holds."""
    return dict(
        await conn.fetchrow(
            "SELECT (SELECT count(*) FROM chunkd.history_jobs WHERE public_id = $1) AS jobs,"
            " (SELECT count(*) FROM chunkd.history_chunks WHERE sync_job_id = $1) AS chunks,"
            " (SELECT count(*) FROM chunkd.history_attempts WHERE sync_job_id = $1) AS attempts,"
            " (SELECT count(*) FROM chunkd.history_events WHERE sync_job_id = $1) AS events",
            job,
        )
    )


async def live_rows(conn: asyncpg.Connection, job: UUID) -> dict[str, int]:
    """How many rows of ``job`` each live table holds."""
    return dict(
        await conn.fetchrow(
            "SELECT (SELECT count(*) FROM chunkd.jobs WHERE public_id = $1) AS jobs,"
            " (SELECT count(*) FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id"
            "   WHERE j.public_id = $1) AS chunks,"
            " (SELECT count(*) FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id"
            "   WHERE j.public_id = $1) AS attempts,"
            " (SELECT count(*) FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id"
            "   WHERE j.public_id = $1) AS events",
            job,
        )
    )


async def counts_match(conn: asyncpg.Connection) -> None:
    """chunkd.history_counts says exactly what the history holds."""
    kept = await conn.fetch(
        "SELECT from_at, kind, status, jobs, chunks FROM chunkd.history_counts WHERE jobs > 0"
        " ORDER BY 1, 2, 3"
    )
    actual = await conn.fetch(
        "SELECT p.from_at, h.kind, h.status, count(*) AS jobs, sum(h.total_chunks) AS chunks"
        " FROM chunkd.history_jobs h JOIN chunkd.history_partitions p"
        "   ON h.expires_at >= p.from_at AND h.expires_at < p.to_at"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    assert [tuple(r) for r in kept] == [tuple(r) for r in actual]
