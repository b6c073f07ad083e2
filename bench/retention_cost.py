"""What retention costs per chunk: the maintenance's move of finished jobs to the history, and the
drop of expired partitions, beside ``chunkd purge`` (a DELETE) of the same jobs.

One throwaway cluster (fsync on, autovacuum off, as bench/sql_cost.py), and per window a fresh
database: CHECKPOINT, the schema, ``--chunks`` chunks in jobs of ``--job-size``, enqueued,
claimed and completed through the SQL functions (2 % of the jobs end with a failed chunk),
VACUUM ANALYZE; then, on one connection, one of:

- move: ``chunkd.retention_round()`` until it has nothing left (what the daemons do);
- purge: ``chunkd.purge_finished_jobs('0 seconds')`` (what ``chunkd purge --older-than 0`` does,
  the only way to remove finished work before retention);
- drop: the move with policies of 2 s, then, once the rows have expired, the rounds that drop
  their partitions (the cost of expiry itself).

Per chunk: the backend's CPU (utime+stime from /proc), the cluster's WAL, and the rows deleted
from the live tables (each one a dead row for vacuum to clean; the history's rows go with their
partition, none of them deleted). Prints a table and one
JSON line (also bench/results/retention_cost.json).

    .venv/bin/python bench/retention_cost.py [--chunks 30000] [--job-size 1 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sql_cost import CLUSTER_SETTINGS, Window

from chunkd import __version__
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster

RESULTS = Path(__file__).resolve().parent / "results"


async def load(conn: asyncpg.Connection, chunks: int, job_size: int) -> None:
    """Finished jobs through the public functions: enqueue, claim, complete (a failed chunk in
    2 % of the jobs)."""
    jobs = chunks // job_size
    await conn.execute(
        "SELECT count(*) FROM chunkd.create_sync_jobs((SELECT jsonb_agg(jsonb_build_object("
        " 'kind', 'k', 'max_attempts', 1, 'chunks', (SELECT jsonb_agg(jsonb_build_object('i', s))"
        " FROM generate_series(1, $2::int) s))) FROM generate_series(1, $1::int) g))",
        jobs,
        job_size,
    )
    while True:
        rows = await conn.fetch("SELECT id, attempt FROM chunkd.claim_chunks('w', 1000, NULL, 600)")
        if not rows:
            return
        failing = {r["id"] for r in rows if r["id"] % (50 * job_size) == 0}
        for r in rows:
            if r["id"] in failing:
                await conn.execute("SELECT chunkd.fail_attempt('w', $1, $2, 'no', false)", *r)
        done = [r for r in rows if r["id"] not in failing]
        await conn.execute(
            "SELECT chunkd.complete_attempts('w', $1, $2)",
            [r["id"] for r in done],
            [r["attempt"] for r in done],
        )


async def live_rows(dsn: str) -> int:
    """Rows in the live tables (of jobs, chunks, the queue, attempts, events, rate buckets)."""
    conn = await connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM chunkd.jobs) + (SELECT count(*) FROM chunkd.chunks)"
                " + (SELECT count(*) FROM chunkd.ready) + (SELECT count(*) FROM chunkd.scheduled)"
                " + (SELECT count(*) FROM chunkd.attempts) + (SELECT count(*) FROM chunkd.events)"
                " + (SELECT count(*) FROM chunkd.job_rates)"
            )
        )
    finally:
        await conn.close()


async def window(
    cluster: PostgresCluster, admin: asyncpg.Connection, what: str, chunks: int, job_size: int
) -> dict[str, Any]:
    name = f"cost_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = cluster.dsn(name)
    try:
        # As bench/sql_cost.py: the CHECKPOINT before the load, so that every page the loop
        # touches was first written after it and the loop logs no full-page image.
        await admin.execute("CHECKPOINT")
        conn = await connect(dsn)
        try:
            await apply_migrations(conn)
            if what == "drop":
                for state in ("completed", "failed", "cancelled"):
                    await conn.execute("SELECT chunkd.set_retention($1, '2 seconds')", state)
            await load(conn, chunks, job_size)
            if what == "drop":
                while (await conn.fetchrow("SELECT * FROM chunkd.retention_round(5000)"))["more"]:
                    pass
                await asyncio.sleep(3.5)  # every row expires, every partition's range passes
            await conn.execute("VACUUM ANALYZE")
            rows_before = await live_rows(dsn)
        finally:
            await conn.close()
        conn = await connect(dsn)
        pid = await conn.fetchval("SELECT pg_backend_pid()")

        async def loop() -> int:
            if what == "purge":
                await conn.fetchval("SELECT chunkd.purge_finished_jobs('0 seconds')")
                return chunks
            moved = 0
            while True:
                row = await conn.fetchrow("SELECT * FROM chunkd.retention_round(5000)")
                moved += row["moved_chunks"]
                if not row["more"]:
                    return chunks if what == "drop" else moved

        result = await Window(admin, pid).run(loop, conn.close)
        result["live_rows_deleted"] = round((rows_before - await live_rows(dsn)) / chunks, 2)
        return result
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def measure(cluster: PostgresCluster, opts: argparse.Namespace) -> dict[str, Any]:
    admin = await connect(cluster.dsn("postgres"))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(opts.reps):
            for size in opts.job_size:
                for what in ("move", "purge", "drop"):
                    result = await window(cluster, admin, what, opts.chunks, size)
                    runs.setdefault(f"{what}, jobs of {size}", []).append(result)
                    print(f"  rep {rep + 1} {what:<5} jobs of {size:<4} {result}", file=sys.stderr)
    finally:
        await admin.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=30_000)
    parser.add_argument("--job-size", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--reps", type=int, default=3)
    opts = parser.parse_args()
    cluster = PostgresCluster(fsync=True, extra_settings=CLUSTER_SETTINGS)
    cluster.start()
    started = time.monotonic()
    try:
        runs = asyncio.run(measure(cluster, opts))
    finally:
        cluster.cleanup()
    keys = ("server_cpu_us", "wal_bytes", "live_rows_deleted", "wall_us")
    summary = {
        name: {k: statistics.median(r[k] for r in results) for k in keys}
        for name, results in runs.items()
    }
    print(f"\nretention per chunk, {opts.chunks:,} chunks, median of {opts.reps} reps\n")
    print(f"| {'what':<22} | server CPU µs | WAL B | live rows deleted | wall µs |")
    print(f"|{'-' * 24}|---------------|-------|-------------------|---------|")
    for name, row in summary.items():
        print(f"| {name:<22} | {row['server_cpu_us']:13.1f} | {row['wal_bytes']:5.0f} | "
              f"{row['live_rows_deleted']:17.2f} | {row['wall_us']:7.1f} |")  # fmt: skip
    record = {
        "bench": "retention_cost",
        "version": __version__,
        "chunks": opts.chunks,
        "reps": opts.reps,
        "per_chunk_median": summary,
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retention_cost.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
