"""How fast the dashboard's pages paint with a big queue: 10,000 jobs, one of them with
100,000 chunks, in every state (issue 15: jobs page <= 1 s to first paint, job page <= 2 s).

A throwaway PostgreSQL cluster (chunkd.demo.cluster), the schema, then the data through the
public functions only: 10,000 jobs of 10 chunks (mail-sync, import, export), 1,000 labeled
one-chunk jobs with a dedupe key (for the search) and one job of 100,000 chunks, driven with
claim_chunks / complete_attempts / fail_attempt into a mix of completed, failed, waiting for a
retry, processing and pending; two registered workers.
Then ``chunkd web`` (a real subprocess) and Debian's headless Chromium (Playwright, a fresh
browser context per load, so nothing is cached) load each page ``--reps`` times and read the
browser's own timings:

- first paint: the ``first-paint`` entry of the Paint Timing API, from navigation start;
- html: the page's HTML response complete (``responseEnd``), i.e. the server's time plus
  the transfer;
- map: for the job page, until the chunk map's 100,000 cells are drawn (its canvas publishes
  the time it was drawn);

and prints a table of medians and maxima, then one JSON line (also written to
bench/results/web_pages.json).

    .venv/bin/python bench/web_pages.py [--reps 5] [--jobs 10000] [--big 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from web_common import chromium, require_chromium, web_server

from chunkd import __version__
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import throwaway_cluster

RESULTS = Path(__file__).resolve().parent / "results"


async def populate(dsn: str, jobs: int, big: int) -> dict[str, str]:
    """The data set; returns the ids of the pages to load."""
    conn = await connect(dsn)
    try:
        await apply_migrations(conn)
        await conn.execute(
            """
            SELECT chunkd.create_sync_job(
                (ARRAY['mail-sync', 'import', 'export'])[1 + i % 3],
                (SELECT jsonb_agg(jsonb_build_object('page', p)) FROM generate_series(1, 10) p),
                jsonb_build_object('account', i))
            FROM generate_series(1, $1::int - 1) i
            """,
            jobs,
        )
        # 1,000 of them labeled, with a dedupe key: what the search reads by index.
        await conn.execute(
            """
            SELECT count(*) FROM chunkd.create_sync_jobs((
                SELECT jsonb_agg(jsonb_build_object(
                    'kind', 'export', 'chunks', '[{"page": 1}]'::jsonb,
                    'label', 'invoice run ' || i, 'dedupe_key', 'account-' || i))
                FROM generate_series(1, 1000) i))
            """
        )
        big_job = await conn.fetchval(
            "SELECT chunkd.create_sync_job('mail-sync', (SELECT jsonb_agg(jsonb_build_object("
            "'page', p)) FROM generate_series(1, $1::int) p), '{\"mailbox\": \"big\"}')",
            big,
        )
        # Drive most of the queue: claims take every job's chunk 0 first, then chunk 1, ...
        # (fair across jobs), so small jobs and the big one advance together. Of each batch:
        # 2 % fail for good, 1 % retry later (waiting), 1 % stay processing, the rest complete.
        for _ in range((jobs * 10 + big) * 7 // 10 // 1000):
            rows = await conn.fetch(
                "SELECT id, attempt FROM chunkd.claim_chunks('w1', 1000, NULL, 3600)"
            )
            if not rows:
                break
            ids = [r["id"] for r in rows]
            attempts = [r["attempt"] for r in rows]
            for i, a in zip(ids[:20], attempts[:20], strict=True):
                await conn.execute(
                    "SELECT chunkd.fail_attempt('w1', $1, $2, 'IMAP: connection reset', false)",
                    i, a,
                )  # fmt: skip
            for i, a in zip(ids[20:30], attempts[20:30], strict=True):
                await conn.execute(
                    "SELECT chunkd.fail_attempt('w1', $1, $2, 'rate limited', true, 3600)", i, a
                )
            await conn.execute(
                "SELECT count(*) FROM chunkd.complete_attempts('w1', $1::bigint[], $2::int[])",
                ids[40:], attempts[40:],
            )  # fmt: skip
        for worker in ("host-a:101:aaaa", "host-b:202:bbbb"):
            await conn.execute(
                "SELECT chunkd.register_worker($1, split_part($1, ':', 1), 1, $2,"
                " '{mail-sync,import,export}', 20)",
                worker, __version__,
            )  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
        counts = await conn.fetch(
            "SELECT overall_status, count(*) FROM chunkd.chunk_processing_status GROUP BY 1"
        )
        print("jobs by status:", {r[0]: r[1] for r in counts}, file=sys.stderr)
        print("big job:", await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", big_job),
              file=sys.stderr)  # fmt: skip
        small = await conn.fetchval(
            "SELECT parent_sync_job_id FROM chunkd.chunk_processing_status"
            " WHERE total_chunks = 10 ORDER BY failed_chunks DESC, created_at LIMIT 1"
        )
        return {"big": str(big_job), "small": str(small)}
    finally:
        await conn.close()


TIMINGS = """
async () => {
  // The paint entries are recorded once a frame is presented, which headless Chromium may do
  // well after two animation frames: wait for the first one (buffered), for at most 5 s.
  const paints = await new Promise((done) => {
    const seen = performance.getEntriesByType("paint");
    if (seen.length) return done(seen);
    const observer = new PerformanceObserver((list) => {
      observer.disconnect();
      done(list.getEntries());
    });
    observer.observe({ type: "paint", buffered: true });
    setTimeout(() => { observer.disconnect(); done(performance.getEntriesByType("paint")); },
               5000);
  });
  const nav = performance.getEntriesByType("navigation")[0];
  const paint = paints.find((e) => e.name === "first-paint") || paints[0];
  const map = document.querySelector("#chunk-map");
  return {
    first_paint_ms: paint ? paint.startTime : null,
    html_ms: nav.responseEnd,
    html_bytes: nav.transferSize,
    map_ms: map && map.dataset.drawn ? Number(map.dataset.drawn) - performance.timeOrigin : null,
    map_cells: map ? Number(map.dataset.cells || 0) : null,
  };
}
"""


async def measure(url: str, pages: dict[str, str], reps: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in pages}
    async with chromium() as browser:
        for _ in range(reps):
            for name, path in pages.items():
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                page = await context.new_page()
                await page.goto(url + path, wait_until="load")
                if "map" in name:
                    deadline = time.monotonic() + 30
                    while not await page.evaluate(
                        "() => Boolean(document.querySelector('#chunk-map').dataset.drawn)"
                    ):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the chunk map was never drawn")
                        await asyncio.sleep(0.02)
                results[name].append(await page.evaluate(TIMINGS))
                await context.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    args = parser.parse_args()
    require_chromium()
    with throwaway_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        dsn = cluster.dsn("postgres")
        started = time.monotonic()
        ids = asyncio.run(populate(dsn, args.jobs, args.big))
        print(f"data loaded in {time.monotonic() - started:.0f}s", file=sys.stderr)
        pages = {
            "jobs (newest 50)": "/jobs",
            "jobs ?status=processing": "/jobs?status=processing",
            "jobs ?kind=import&page=50": "/jobs?kind=import&page=50",
            "jobs ?q= a label's start": "/jobs?q=invoice+run+42",
            "jobs ?q= a kind's start": "/jobs?q=imp",
            "jobs ?q= an id's start": f"/jobs?q={ids['big'][:8]}",
            "kind page ?kind=mail-sync": "/jobs?kind=mail-sync",
            f"job of {args.big:,} chunks + map": f"/jobs/{ids['big']}",
            "job of 10 chunks + map": f"/jobs/{ids['small']}",
            "workers": "/workers",
            "queue": "/queue",
        }
        with web_server(dsn, Path(tmp) / "web.log") as url:
            results = asyncio.run(measure(url, pages, args.reps))
    summary = {}
    print(f"\nchunkd {__version__} web pages, {args.jobs:,} jobs, one of {args.big:,} chunks; "
          f"median (max) of {args.reps} loads in Chromium, ms\n")  # fmt: skip
    print(f"| {'page':<32} | {'first paint':>16} | {'html':>14} | {'map drawn':>16} | KB html |")
    print(f"|{'-' * 34}|{'-' * 18}|{'-' * 16}|{'-' * 18}|---------|")
    for name, runs in results.items():
        row = {}
        for key in ("first_paint_ms", "html_ms", "map_ms"):
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = (statistics.median(values), max(values)) if values else None
        row["html_kb"] = statistics.median(r["html_bytes"] for r in runs) / 1024
        row["map_cells"] = runs[-1]["map_cells"]
        summary[name] = row

        def cell(value: tuple[float, float] | None) -> str:
            return "" if value is None else f"{value[0]:,.0f} ({value[1]:,.0f})"

        print(f"| {name:<32} | {cell(row['first_paint_ms']):>16} | {cell(row['html_ms']):>14} | "
              f"{cell(row['map_ms']):>16} | {row['html_kb']:7.1f} |")  # fmt: skip
    record = {
        "bench": "web_pages",
        "version": __version__,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "jobs": args.jobs,
        "big_job_chunks": args.big,
        "reps": args.reps,
        "pages": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "web_pages.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
