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

``--history N`` (issue 25) adds N finished chunks in the history (jobs of ``--history-job-size``
chunks, and one of ``--big`` chunks), written straight into the history tables
(bench/history_fill.py) and analyzed, and the pages of jobs in the history; and times
``chunkd status`` and ``chunkd status JOB`` (a job in the history) as processes, ``--reps``
times each, and ``chunkd --version`` (the process's start-up alone), and their statements
alone on one connection.

    .venv/bin/python bench/web_pages.py [--reps 5] [--jobs 10000] [--big 100000]
                                        [--history 10000000] [--history-job-size 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from history_fill import fill_history
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
                response = await page.goto(url + path, wait_until="load")
                if response is None or response.status != 200:
                    body = (await page.content())[:2000]
                    raise RuntimeError(f"{path}: {response and response.status}\n{body}")
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


async def populate_history(dsn: str, chunks: int, job_size: int, big: int) -> dict[str, str]:
    """``chunks`` finished chunks in the history (and one job of ``big``); the ids of a failed
    job of ``job_size`` chunks and of the big one."""
    conn = await connect(dsn)
    try:
        await fill_history(conn, chunks // job_size, job_size)
        await fill_history(conn, 1, big)
        await conn.execute(
            "ANALYZE chunkd.history_jobs, chunkd.history_chunks, chunkd.history_attempts,"
            " chunkd.history_events"
        )
        await conn.execute("VACUUM ANALYZE")
        return {
            "old": str(await conn.fetchval(
                "SELECT public_id FROM chunkd.history_jobs WHERE status = 'partial_failure'"
                " AND total_chunks = $1 ORDER BY created_at DESC LIMIT 1", job_size)),
            "old_big": str(await conn.fetchval(
                "SELECT public_id FROM chunkd.history_jobs WHERE total_chunks = $1", big)),
        }  # fmt: skip
    finally:
        await conn.close()


def time_status(dsn: str, job: str, reps: int) -> dict[str, list[float]]:
    """Wall time of ``chunkd status`` and ``chunkd status JOB``, each a process of its own (as
    an operator runs it), ms."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    env["CHUNKD_DSN"] = dsn
    times: dict[str, list[float]] = {
        "chunkd status": [], "chunkd status JOB (history)": [], "chunkd --version": []
    }  # fmt: skip
    for _ in range(reps):
        for name, args in (
            ("chunkd status", ["status"]),
            ("chunkd status JOB (history)", ["status", job]),
            ("chunkd --version", ["--version"]),
        ):
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "chunkd.cli", *args],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            times[name].append((time.monotonic() - started) * 1000)
    return times


async def time_status_statements(dsn: str, job: str, reps: int) -> dict[str, list[float]]:
    """What ``chunkd status`` and ``chunkd status JOB`` ask the database, alone (in this
    process, one connection, each call timed), ms."""
    from uuid import UUID

    from chunkd import ops

    conn = await connect(dsn)
    times: dict[str, list[float]] = {"status statements": [], "status JOB statements": []}
    try:
        for _ in range(reps):
            started = time.monotonic()
            await ops.list_jobs(conn, limit=20)
            await ops.flow_limits(conn)
            times["status statements"].append((time.monotonic() - started) * 1000)
            started = time.monotonic()
            await ops.job_detail(conn, UUID(job), stale_after_s=30)
            times["status JOB statements"].append((time.monotonic() - started) * 1000)
    finally:
        await conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=0)
    parser.add_argument("--history-job-size", type=int, default=10)
    args = parser.parse_args()
    require_chromium()
    with throwaway_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        dsn = cluster.dsn("postgres")
        started = time.monotonic()
        ids = asyncio.run(populate(dsn, args.jobs, args.big))
        if args.history:
            ids.update(
                asyncio.run(populate_history(dsn, args.history, args.history_job_size, args.big))
            )
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
        if args.history:
            pages["jobs ?status=partial_failure"] = "/jobs?status=partial_failure"
            pages[f"job in history, {args.history_job_size} chunks + map"] = f"/jobs/{ids['old']}"
            pages[f"job in history, {args.big:,} chunks + map"] = f"/jobs/{ids['old_big']}"
        with web_server(dsn, Path(tmp) / "web.log") as url:
            results = asyncio.run(measure(url, pages, args.reps))
        status = time_status(dsn, ids["old"], args.reps) if args.history else {}
        if args.history:
            status.update(asyncio.run(time_status_statements(dsn, ids["old"], args.reps)))
    summary = {}
    history = f", {args.history:,} finished chunks in the history" if args.history else ""
    print(f"\nchunkd {__version__} web pages, {args.jobs:,} jobs, one of {args.big:,} chunks"
          f"{history}; median (max) of {args.reps} loads in Chromium, ms\n")  # fmt: skip
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
    for name, runs_ms in status.items():
        print(f"{name}: median {statistics.median(runs_ms):,.0f} ms (max {max(runs_ms):,.0f})")
    record = {
        "bench": "web_pages",
        "history_chunks": args.history,
        "status_ms": {k: statistics.median(v) for k, v in status.items()},
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
