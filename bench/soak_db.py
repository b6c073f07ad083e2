"""The soak's reads of the database (bench/soak.py): the accounting scan, table and index
sizes, dead tuples, the xmin horizon, expired jobs, and whether retention exists.

Every value is a bound parameter. The sampler's connection plans each statement for its
parameters (``plan_cache_mode = force_custom_plan``), so the scan from the low water stays an
index range scan however stale the statistics of the queue tables are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# With retention (schema version 16) the daemons' maintenance moves a
# finished job's rows out of the live tables into history_jobs, history_chunks and
# history_attempts in one transaction: in any snapshot a chunk is in one place or the other, and
# the reads below take the union when the history tables exist.
HISTORY_SQL = "SELECT to_regclass('chunkd.history_chunks') IS NOT NULL"


# Lowest chunk id not yet terminal, or one past the newest chunk (least() skips NULLs;
# unfinished chunks are always live). OFFSET 0 keeps min() over open attempts on their partial
# index (a few rows) instead of a walk up the primary key past every finished attempt.
LOW_WATER_SQL = """
SELECT least((SELECT min(r.chunk_id) FROM chunkd.ready r),
             (SELECT min(s.chunk_id) FROM chunkd.scheduled s),
             (SELECT min(o.chunk_id) FROM (SELECT a.chunk_id FROM chunkd.attempts a
                                       WHERE a.ended_at IS NULL OFFSET 0) o),
             coalesce((SELECT max(c.id) FROM chunkd.chunks c), $1::bigint - 1) + 1)
"""
LOW_WATER_HISTORY_SQL = """
SELECT least((SELECT min(r.chunk_id) FROM chunkd.ready r),
             (SELECT min(s.chunk_id) FROM chunkd.scheduled s),
             (SELECT min(o.chunk_id) FROM (SELECT a.chunk_id FROM chunkd.attempts a
                                       WHERE a.ended_at IS NULL OFFSET 0) o),
             coalesce(greatest((SELECT max(c.id) FROM chunkd.chunks c),
                               (SELECT max(h.id) FROM chunkd.history_chunks h)),
                      $1::bigint - 1) + 1)
"""

# Every chunk from the low water up: its number, its first claim's enqueue-to-claim time (the
# claim's clock reading minus the enqueue transaction's start), its completed attempts. Range
# scans and a hash join: linear in the rows read.
SCAN_SQL = """
WITH c AS (SELECT c.id, c.payload, c.created_at FROM chunkd.chunks c WHERE c.id >= $1),
a AS (
    SELECT x.chunk_id, min(x.claimed_at) FILTER (WHERE x.n = 1) AS first_claim,
           count(*) FILTER (WHERE x.outcome = 'completed')::int AS done
    FROM chunkd.attempts x WHERE x.chunk_id >= $1 GROUP BY x.chunk_id
)
SELECT coalesce(array_agg(CASE WHEN jsonb_typeof(c.payload -> 'i') = 'number'
                               THEN (c.payload ->> 'i')::bigint END), '{}') AS seqs,
       coalesce(array_agg(extract(epoch FROM a.first_claim - c.created_at)::float8 * 1000),
                '{}') AS waits_ms,
       coalesce(array_agg(coalesce(a.done, 0)), '{}') AS done
FROM c LEFT JOIN a ON a.chunk_id = c.id
"""
SCAN_HISTORY_SQL = """
WITH c AS (
    SELECT c.id, c.payload, c.created_at FROM chunkd.chunks c WHERE c.id >= $1
    UNION ALL
    SELECT h.id, h.payload, h.created_at FROM chunkd.history_chunks h WHERE h.id >= $1
), a AS (
    SELECT x.chunk_id, min(x.claimed_at) FILTER (WHERE x.n = 1) AS first_claim,
           count(*) FILTER (WHERE x.outcome = 'completed')::int AS done
    FROM (SELECT l.chunk_id, l.n, l.outcome, l.claimed_at FROM chunkd.attempts l
          WHERE l.chunk_id >= $1
          UNION ALL
          SELECT h.chunk_id, h.n, h.outcome, h.claimed_at FROM chunkd.history_attempts h
          WHERE h.chunk_id >= $1) x
    GROUP BY x.chunk_id
)
SELECT coalesce(array_agg(CASE WHEN jsonb_typeof(c.payload -> 'i') = 'number'
                               THEN (c.payload ->> 'i')::bigint END), '{}') AS seqs,
       coalesce(array_agg(extract(epoch FROM a.first_claim - c.created_at)::float8 * 1000),
                '{}') AS waits_ms,
       coalesce(array_agg(coalesce(a.done, 0)), '{}') AS done
FROM c LEFT JOIN a ON a.chunk_id = c.id
"""

# chunkd's tables, partitions included (a partitioned parent has no storage of its own).
TABLES_SQL = """
SELECT n.nspname || '.' || c.relname AS name,
       pg_table_size(c.oid) AS table_bytes,
       pg_indexes_size(c.oid) AS index_bytes,
       coalesce(s.n_dead_tup, 0) AS dead,
       coalesce(s.n_live_tup, 0) AS live,
       coalesce(s.autovacuum_count, 0) + coalesce(s.vacuum_count, 0) AS vacuums
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE n.nspname LIKE 'chunkd%' AND c.relkind IN ('r', 'm')
ORDER BY 1
"""

XMIN_AGE_SQL = """
SELECT coalesce(greatest(max(age(backend_xmin)), max(age(backend_xid))), 0)::bigint
FROM pg_stat_activity WHERE datname = current_database()
"""

HOLDER_SQL = "SELECT backend_xmin::text AS xmin, state FROM pg_stat_activity WHERE pid = $1"


# Jobs, live or in the history, that finished before now() - $1 seconds.
EXPIRED_SQL = """
SELECT count(*) FROM chunkd.jobs j
WHERE j.finished_at < now() - $1::float8 * interval '1 second'
"""
EXPIRED_HISTORY_SQL = """
SELECT (SELECT count(*) FROM chunkd.jobs j
        WHERE j.finished_at < now() - $1::float8 * interval '1 second')
     + (SELECT count(*) FROM chunkd.history_jobs h
        WHERE h.finished_at < now() - $1::float8 * interval '1 second')
"""

# The retention branch's SQL function (sql/functions/retention.sql).
SET_RETENTION = "chunkd.set_retention(text,interval)"
RETENTION_SQL = "SELECT to_regprocedure($1) IS NOT NULL"
SET_RETENTION_SQL = "SELECT chunkd.set_retention($1, $2::float8 * interval '1 second')"
WIDTH_SQL = "SELECT chunkd.history_width_s()"

PURGE_SQL = "SELECT chunkd.purge_finished_jobs($1::float8 * interval '1 second')"


# At the end: jobs left (live, and in the history), unfinished, finished but not wholly
# completed, and attempts whose job is gone.
LEFTOVERS_SQL = """
SELECT count(*) AS jobs,
       count(*) FILTER (WHERE j.finished_at IS NULL) AS unfinished,
       count(*) FILTER (WHERE j.completed_chunks <> j.total_chunks) AS not_completed,
       (SELECT count(*) FROM chunkd.attempts a
        WHERE NOT EXISTS (SELECT 1 FROM chunkd.jobs o WHERE o.id = a.job_id)) AS orphan_attempts
FROM chunkd.jobs j
"""
LEFTOVERS_HISTORY_SQL = """
WITH l AS (
    SELECT count(*) AS jobs,
           count(*) FILTER (WHERE j.finished_at IS NULL) AS unfinished,
           count(*) FILTER (WHERE j.completed_chunks <> j.total_chunks) AS not_completed
    FROM chunkd.jobs j
), h AS (
    SELECT count(*) AS jobs, count(*) FILTER (WHERE j.status <> 'completed') AS not_completed
    FROM chunkd.history_jobs j
)
SELECT l.jobs + h.jobs AS jobs, l.unfinished,
       l.not_completed + h.not_completed AS not_completed,
       (SELECT count(*) FROM chunkd.attempts a
        WHERE NOT EXISTS (SELECT 1 FROM chunkd.jobs o WHERE o.id = a.job_id))
     + (SELECT count(*) FROM chunkd.history_attempts a
        WHERE NOT EXISTS (SELECT 1 FROM chunkd.history_jobs o WHERE o.id = a.job_id)
          AND NOT EXISTS (SELECT 1 FROM chunkd.jobs o WHERE o.id = a.job_id))
       AS orphan_attempts
FROM l, h
"""


@dataclass
class Scan:
    at: datetime
    seqs: list[int | None]
    waits_ms: list[float | None]
    done: list[int]
    next_low_water: int


async def prepare_sampler(conn: Any) -> None:
    await conn.execute("SET plan_cache_mode = force_custom_plan")


async def has_history(conn: Any) -> bool:
    """Whether the schema keeps finished jobs in history tables (retention)."""
    return bool(await conn.fetchval(HISTORY_SQL))


async def scan(conn: Any, low_water: int, history: bool) -> Scan:
    """One consistent read (REPEATABLE READ): the snapshot's time, the chunks from
    ``low_water`` up and the next low water."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        at = await conn.fetchval("SELECT clock_timestamp()")  # the snapshot is taken here
        next_low = await conn.fetchval(
            LOW_WATER_HISTORY_SQL if history else LOW_WATER_SQL, low_water
        )
        row = await conn.fetchrow(SCAN_HISTORY_SQL if history else SCAN_SQL, low_water)
    return Scan(at, list(row["seqs"]), list(row["waits_ms"]), list(row["done"]), int(next_low))


async def tables(conn: Any) -> dict[str, dict[str, int]]:
    """Per table: heap (with TOAST) and index bytes, dead and live tuples, vacuums so far.
    A partition dropped while this runs has no size and is left out."""
    rows = await conn.fetch(TABLES_SQL)
    return {
        r["name"]: {
            "table": r["table_bytes"],
            "indexes": r["index_bytes"],
            "dead": r["dead"],
            "live": r["live"],
            "vacuums": r["vacuums"],
        }
        for r in rows
        if r["table_bytes"] is not None and r["index_bytes"] is not None
    }


async def xmin_age(conn: Any) -> int:
    """Transactions the oldest snapshot or transaction id of this database holds back."""
    return int(await conn.fetchval(XMIN_AGE_SQL))


async def holder_state(conn: Any, pid: int) -> dict[str, str | None]:
    """The holder's xmin and state, read from another session (pg_stat_activity is cached
    inside the holder's own transaction)."""
    row = await conn.fetchrow(HOLDER_SQL, pid)
    return {"xmin": row["xmin"] if row else None, "state": row["state"] if row else None}


async def expired_jobs(conn: Any, older_than_s: float, history: bool) -> int:
    return int(await conn.fetchval(EXPIRED_HISTORY_SQL if history else EXPIRED_SQL, older_than_s))


async def has_retention(conn: Any) -> bool:
    """Whether ``chunkd.set_retention(text, interval)`` exists in this schema."""
    return bool(await conn.fetchval(RETENTION_SQL, SET_RETENTION))


async def set_retention(conn: Any, keep_s: float) -> float:
    """Every terminal state's policy to ``keep_s``; the history partitions' width (s)."""
    for state in ("completed", "failed", "cancelled"):
        await conn.execute(SET_RETENTION_SQL, state, keep_s)
    return float(await conn.fetchval(WIDTH_SQL))


async def purge(conn: Any, older_than_s: float) -> int:
    return int(await conn.fetchval(PURGE_SQL, older_than_s))


async def leftovers(conn: Any, history: bool) -> dict[str, int]:
    row = await conn.fetchrow(LEFTOVERS_HISTORY_SQL if history else LEFTOVERS_SQL)
    return {k: int(row[k]) for k in ("jobs", "unfinished", "not_completed", "orphan_attempts")}
