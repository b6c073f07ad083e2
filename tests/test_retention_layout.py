"""Each history table holds every column of its live table (schema version 16 made them with
LIKE): a later migration that adds a column to a live table must add it to the history table
too, or the move would fail (or, worse, drop the value). The move and the restore copy column by
column, so a column added to both travels without a change to the SQL functions."""

from __future__ import annotations

import asyncpg

from history_helpers import rounds_until_idle
from sql_helpers import claim, complete, create_job

PAIRS = {
    "jobs": "history_jobs",
    "chunks": "history_chunks",
    "attempts": "history_attempts",
    "events": "history_events",
}


async def missing_columns(conn: asyncpg.Connection) -> list[str]:
    """``live.column type`` for each column of a live table its history table lacks (or holds
    with another type)."""
    rows = await conn.fetch(
        "SELECT l.relname AS live, a.attname AS col, format_type(a.atttypid, a.atttypmod) AS type"
        " FROM unnest($1::text[], $2::text[]) AS p(live, history)"
        " JOIN pg_class l ON l.relname = p.live AND l.relnamespace = 'chunkd'::regnamespace"
        " JOIN pg_attribute a ON a.attrelid = l.oid AND a.attnum > 0 AND NOT a.attisdropped"
        " WHERE NOT EXISTS ("
        "   SELECT 1 FROM pg_attribute h"
        "   WHERE h.attrelid = ('chunkd.' || p.history)::regclass AND h.attname = a.attname"
        "     AND NOT h.attisdropped AND h.atttypid = a.atttypid AND h.atttypmod = a.atttypmod)"
        " ORDER BY 1, 2",
        list(PAIRS),
        list(PAIRS.values()),
    )
    return [f"{r['live']}.{r['col']} {r['type']}" for r in rows]


async def test_every_live_column_is_in_its_history_table(conn) -> None:
    assert await missing_columns(conn) == []


async def test_a_column_added_to_a_live_table_alone_is_caught(conn) -> None:
    await conn.execute("ALTER TABLE chunkd.jobs ADD COLUMN labels jsonb")
    await conn.execute("ALTER TABLE chunkd.attempts ADD COLUMN trace text")
    assert await missing_columns(conn) == ["attempts.trace text", "jobs.labels jsonb"]


async def test_a_column_added_to_both_moves_and_comes_back(conn) -> None:
    await conn.execute("ALTER TABLE chunkd.jobs ADD COLUMN labels jsonb")
    await conn.execute("ALTER TABLE chunkd.history_jobs ADD COLUMN labels jsonb")
    job = await create_job(conn, 1, kind="labelled", max_attempts=1)
    await conn.execute(
        'UPDATE chunkd.jobs SET labels = \'{"team": "mail"}\' WHERE public_id = $1', job
    )
    (row,) = await claim(conn, "w1", 1, kinds=["labelled"])
    assert await conn.fetchval(
        "SELECT chunkd.fail_chunk_job_safe($1, 'w1', 1, 'no', false)", row["queue_id"]
    )
    await rounds_until_idle(conn)
    assert (
        await conn.fetchval(
            "SELECT labels->>'team' FROM chunkd.history_jobs WHERE public_id = $1", job
        )
        == "mail"
    )
    assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", job) == 1
    assert (
        await conn.fetchval("SELECT labels->>'team' FROM chunkd.jobs WHERE public_id = $1", job)
        == "mail"
    )
    (again,) = await claim(conn, "w1", 1, kinds=["labelled"])
    assert await complete(conn, again["queue_id"], "w1", again["attempt"])
