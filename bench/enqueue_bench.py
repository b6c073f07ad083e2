"""Enqueue throughput: one-chunk jobs per second through the Python client, on one asyncpg
connection, each call committed on its own (autocommit, durable: fsync and synchronous_commit
as the cluster has them).

- ``per_second``: ``chunkd.create_sync_jobs`` with ``--batch`` jobs per call (the planner that
  fans out one job per mailbox); the target is >= 5,000/s;
- ``keyed_per_second``: the same, every job with its own dedupe key (the unique index's cost);
- ``single_per_second``: ``chunkd.create_sync_job``, one job per call and per commit.

    python bench/enqueue_bench.py --dsn postgresql://... [--jobs 20000] [--batch 1000]

Prints one JSON object on stdout (bench/run.py reads it); the database must be empty: the
schema is installed here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import chunkd
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations

KIND = "bench-enqueue"


async def _bulk(conn: Any, total: int, batch: int, *, keyed: bool, tag: str) -> float:
    started = time.perf_counter()
    for first in range(0, total, batch):
        jobs = [
            {"kind": KIND, "chunks": [{"i": i}]} | ({"dedupe_key": f"{tag}-{i}"} if keyed else {})
            for i in range(first, min(total, first + batch))
        ]
        ids = await chunkd.create_sync_jobs(conn, jobs)
        assert len(ids) == len(jobs)
    return total / (time.perf_counter() - started)


async def _single(conn: Any, total: int) -> float:
    started = time.perf_counter()
    for i in range(total):
        await chunkd.create_sync_job(conn, KIND, [{"i": i}])
    return total / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    conn = await connect(args.dsn, application_name="chunkd-bench-enqueue")
    try:
        await apply_migrations(conn)
        server = await conn.fetchrow(
            "SELECT current_setting('server_version') AS server_version,"
            " current_setting('fsync') AS fsync,"
            " current_setting('synchronous_commit') AS synchronous_commit"
        )
        await _bulk(conn, args.batch, args.batch, keyed=False, tag="warm")  # plans cached
        per_second = await _bulk(conn, args.jobs, args.batch, keyed=False, tag="plain")
        keyed = await _bulk(conn, args.jobs, args.batch, keyed=True, tag="keyed")
        single = await _single(conn, args.single)
        created = await conn.fetchval("SELECT count(*) FROM chunkd.jobs")
        expected = args.batch + 2 * args.jobs + args.single
        if created != expected:
            raise RuntimeError(f"{created} jobs in the table, expected {expected}")
    finally:
        await conn.close()
    return {
        "contender": "chunkd",
        "scenario": "enqueue",
        "per_second": round(per_second, 1),
        "keyed_per_second": round(keyed, 1),
        "single_per_second": round(single, 1),
        "settings": {
            "jobs": args.jobs,
            "batch": args.batch,
            "single_calls": args.single,
            "chunks_per_job": 1,
            "client": "chunkd.client on one asyncpg connection, autocommit",
            **dict(server),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per bulk measurement")
    parser.add_argument("--batch", type=int, default=1_000, help="jobs per create_sync_jobs call")
    parser.add_argument("--single", type=int, default=2_000, help="create_sync_job calls")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        result = asyncio.run(main(parse_args()))
    except Exception as exc:  # one JSON object either way: bench/run.py reads stdout
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    sys.exit(0 if "error" not in result else 1)
