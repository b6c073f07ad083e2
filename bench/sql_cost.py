"""Per-row cost of the SQL contract alone: claim and complete in batches on one connection.

No daemon, no Python handler: this isolates what PostgreSQL spends per chunk on
``claim_next_chunk_job_safe`` and ``complete_chunks`` (audit rows, index maintenance, fsync'd
commits), to compare with the raw loop of bench/peers/raw_sql_bench.py.

    .venv/bin/python bench/sql_cost.py [--chunks 20000] [--batch 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import timedelta

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import throwaway_cluster


async def measure(dsn: str, chunks: int, batch: int) -> dict[str, float]:
    conn = await connect(dsn)
    try:
        await apply_migrations(conn)
        for start in range(0, chunks, 10_000):
            payloads = [{"i": i} for i in range(start, min(chunks, start + 10_000))]
            await conn.fetchval(
                "SELECT chunkd.create_sync_job('k', $1::jsonb)", json.dumps(payloads)
            )
        await conn.execute("VACUUM ANALYZE")
        claim_s = complete_s = 0.0
        done = 0
        while True:
            t0 = time.perf_counter()
            rows = await conn.fetch(
                "SELECT queue_id, attempt FROM chunkd.claim_next_chunk_job_safe('w', $1, NULL, $2)",
                batch,
                timedelta(minutes=10),
            )
            t1 = time.perf_counter()
            if not rows:
                break
            await conn.fetch(
                "SELECT chunkd.complete_chunks('w', $1, $2, NULL)",
                [r["queue_id"] for r in rows],
                [r["attempt"] for r in rows],
            )
            complete_s += time.perf_counter() - t1
            claim_s += t1 - t0
            done += len(rows)
        return {
            "chunks": done,
            "batch": batch,
            "claim_us_per_chunk": round(claim_s / done * 1e6, 1),
            "complete_us_per_chunk": round(complete_s / done * 1e6, 1),
            "per_second": round(done / (claim_s + complete_s), 1),
        }
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    with throwaway_cluster(fsync=True) as cluster:
        print(json.dumps(asyncio.run(measure(cluster.dsn(), args.chunks, args.batch))))


if __name__ == "__main__":
    main()
