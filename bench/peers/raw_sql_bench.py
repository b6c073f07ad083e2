"""Hand-written SKIP LOCKED loop: the practical ceiling for a durable Postgres queue.

No library, no handler, no notifications: one asyncpg connection claims 100 pending
rows and marks them done, two autocommit statements (two WAL flushes with fsync on)
per 100 rows. Anything built on the same table pattern does at least this much work per
job, so its rows/s bounds what a queue on this server can reach. Prints one JSON object.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import asyncpg

try:
    from . import _common as common
except ImportError:  # run as a script: python bench/peers/raw_sql_bench.py
    import _common as common  # type: ignore[no-redef]

CONTENDER = "raw_sql"
DEFAULT_JOBS = {"ceiling": 50_000}
CLAIM_BATCH = 100
# Extra claim rounds allowed beyond ceil(N / batch) before the loop is declared stuck.
SPARE_ROUNDS = 10

SCHEMA_SQL = """
CREATE TABLE raw_queue (
    id bigserial PRIMARY KEY,
    status text NOT NULL DEFAULT 'pending',
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    done_at timestamptz
);
CREATE INDEX raw_queue_pending_idx ON raw_queue (id) WHERE status = 'pending';
"""
LOAD_SQL = (
    "INSERT INTO raw_queue (payload)"
    " SELECT jsonb_build_object('i', g) FROM generate_series(1, $1::int) AS g"
)
CLAIM_SQL = """
UPDATE raw_queue SET status = 'running', claimed_at = now()
WHERE id IN (
    SELECT id FROM raw_queue WHERE status = 'pending'
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
DONE_SQL = "UPDATE raw_queue SET status = 'done', done_at = now() WHERE id = ANY($1::bigint[])"
DONE_COUNT_SQL = "SELECT count(*) FROM raw_queue WHERE status = 'done'"


def loop_settings(settings: str) -> dict[str, Any]:
    """There is nothing to tune: best and default are the same loop, reported as such."""
    return {
        "profile": settings,
        "connections": 1,
        "claim_batch": CLAIM_BATCH,
        "statements_per_batch": 2,
        "transactions": "autocommit: one per statement",
        "pending_index": "partial btree (id) WHERE status = 'pending'",
        "vacuum_analyze_after_load": True,
    }


async def prepare_table(conn: asyncpg.Connection, count: int) -> None:
    """Create and fill the table, then VACUUM ANALYZE; none of this is measured."""
    await conn.execute(SCHEMA_SQL)
    await conn.execute(LOAD_SQL, count)
    await conn.execute("VACUUM ANALYZE raw_queue")


async def drain(conn: asyncpg.Connection, count: int) -> int:
    """Claim-then-complete until a claim comes back empty; returns rows completed."""
    done = 0
    for _ in range(math.ceil(count / CLAIM_BATCH) + SPARE_ROUNDS):
        ids = [row["id"] for row in await conn.fetch(CLAIM_SQL, CLAIM_BATCH)]
        if not ids:
            return done
        await conn.execute(DONE_SQL, ids)
        done += len(ids)
    raise RuntimeError(f"queue not drained after {done} rows; more rows than loaded?")


async def run(opts: common.Options) -> common.Result:
    """Entry point for the `ceiling` scenario; importable for callers that want the dict."""
    conn = await asyncpg.connect(opts.dsn)
    try:
        await prepare_table(conn, opts.jobs)
        started = time.perf_counter()
        completed = await drain(conn, opts.jobs)
        seconds = time.perf_counter() - started
        recorded = await conn.fetchval(DONE_COUNT_SQL)
        if completed != opts.jobs or recorded != opts.jobs:
            raise RuntimeError(f"expected {opts.jobs} done, loop {completed}, table {recorded}")
        return common.throughput_result(
            opts,
            loop_settings(opts.settings),
            seconds,
            round_trips=2 * math.ceil(opts.jobs / CLAIM_BATCH) + 1,
            server=dict(await conn.fetchrow(common.SERVER_INFO_SQL)),
            **common.runtime_info({"asyncpg": asyncpg.__version__}),
        )
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(common.main(CONTENDER, DEFAULT_JOBS, run))
