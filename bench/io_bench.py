"""The ``http:`` handler against a Python handler of the same duration, in a real daemon.

One ``chunkd run`` process (``--concurrency`` 100, then 500) drains 10,000 chunks twice:
with ``bench_handlers:sleep20`` (``await asyncio.sleep(0.020)``) and with
``http:`` to bench/http_endpoint.py answering after 20 ms, a keep-alive endpoint in its own
process (so it does not share the daemon's CPU; it does share the machine). Each drain is
timed from the commit of the enqueue (one job of 10,000 chunks; the daemon is up and
registered, so its LISTEN wakes it) until no chunk is pending or processing, read from the
database every 10 ms; the daemon's CPU (``/proc/<pid>/stat``) over the same span is reported
per chunk. Ideal: concurrency / 20 ms (5,000/s at 100, 25,000/s at 500). Target: http
>= 0.85x the Python handler at concurrency 100.

As a bench/run.py contender (one JSON object on stdout) on the database it is given:

    python bench/io_bench.py --dsn postgresql://...

Standalone, in its own throwaway cluster (fsync on), a fresh database per rep, the order of
the two handlers alternated each rep, medians of the reps printed as a table, then one JSON
line (also written to bench/results/io.json):

    python bench/io_bench.py [--reps 2] [--jobs 10000] [--concurrency 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import http_endpoint

from chunkd import __version__
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DELAY_MS = 20.0
HANDLERS = ("python", "http")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _handler_spec(handler: str, url: str) -> str:
    return f"http:{url}" if handler == "http" else "bench_handlers:sleep20"


async def _until(conn: Any, sql: str, timeout_s: float, interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval(sql):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout_s}s: {sql}")
        await asyncio.sleep(interval_s)


DRAINED = (
    "SELECT NOT EXISTS (SELECT 1 FROM chunkd.chunk_processing_queue"
    " WHERE status IN ('pending', 'processing'))"
)


async def drain(dsn: str, handler: str, url: str, concurrency: int, jobs: int) -> dict[str, Any]:
    """One daemon drains ``jobs`` chunks with one handler; chunks/s and daemon CPU per chunk."""
    env = dict(os.environ, CHUNKD_DSN=dsn, PYTHONPATH=str(BENCH))
    command = [sys.executable, "-m", "chunkd.cli", "--log-level", "warning", "run"]
    command += ["--handler", f"bench={_handler_spec(handler, url)}"]
    command += ["--concurrency", str(concurrency)]
    conn = await connect(dsn)
    daemon = await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.DEVNULL)
    try:
        await conn.execute("TRUNCATE chunkd.workers")
        await _until(conn, "SELECT count(*) = 1 FROM chunkd.workers", 60, 0.05)
        chunks = json.dumps([{"i": i} for i in range(jobs)])
        cpu_before = _cpu_s(daemon.pid)
        await conn.fetchval("SELECT chunkd.create_sync_job('bench', $1::jsonb)", chunks)
        started = time.perf_counter()  # from the commit that NOTIFYs the daemon
        await _until(conn, DRAINED, 600)
        seconds = time.perf_counter() - started
        cpu = _cpu_s(daemon.pid) - cpu_before
        failed = await conn.fetchval(
            "SELECT count(*) FROM chunkd.chunk_processing_queue WHERE status <> 'completed'"
        )
        if failed:
            raise RuntimeError(f"{failed} chunks did not complete with the {handler} handler")
    finally:
        daemon.terminate()
        await asyncio.wait_for(daemon.wait(), 60)
        await conn.close()
    return {
        "per_second": round(jobs / seconds, 1),
        "daemon_cpu_us_per_chunk": round(cpu / jobs * 1e6, 1),
    }


async def one_run(
    dsn: str, url: str, concurrencies: list[int], jobs: int, order: tuple[str, ...] = HANDLERS
) -> dict[str, Any]:
    """Both handlers at each concurrency, on one migrated database."""
    conn = await connect(dsn)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    result: dict[str, Any] = {}
    for concurrency in concurrencies:
        row: dict[str, Any] = {}
        for handler in order:
            row[handler] = await drain(dsn, handler, url, concurrency, jobs)
            print(f"  c={concurrency} {handler}: {row[handler]}", file=sys.stderr, flush=True)
        row["ratio"] = round(row["http"]["per_second"] / row["python"]["per_second"], 3)
        result[str(concurrency)] = row
    return result


def settings(concurrencies: list[int], jobs: int) -> dict[str, Any]:
    return {
        "chunks": jobs,
        "concurrency": concurrencies,
        "python_handler": "bench_handlers:sleep20 (asyncio.sleep(0.020))",
        "http_handler": f"http: to bench/http_endpoint.py, {DELAY_MS:g} ms, keep-alive, "
        "its own process",
        "daemon": "one chunkd run subprocess, --log-level warning, defaults otherwise",
        "durable": "fsync=on, synchronous_commit=on",
        "chunkd": __version__,
    }


def summarise(runs: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Medians over runs, per concurrency and handler."""
    summary: dict[str, Any] = {}
    for c in map(str, concurrencies):
        summary[c] = {
            h: statistics.median(r[c][h]["per_second"] for r in runs) for h in HANDLERS
        } | {"ratio": statistics.median(r[c]["ratio"] for r in runs)}
    return summary


async def as_contender(args: argparse.Namespace) -> dict[str, Any]:
    endpoint, url = http_endpoint.start(DELAY_MS)
    try:
        result = await one_run(args.dsn, url, args.concurrency, args.jobs)
    finally:
        endpoint.terminate()
        endpoint.wait(10)
    ratio = result[str(args.concurrency[0])]["ratio"]
    return {"settings": settings(args.concurrency, args.jobs), **result, "ratio": ratio}


async def standalone(args: argparse.Namespace, cluster: PostgresCluster) -> dict[str, Any]:
    endpoint, url = http_endpoint.start(DELAY_MS)
    runs = []
    try:
        for rep in range(args.reps):
            name = f"io_bench_{rep}"
            admin = await connect(cluster.dsn("postgres"))
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            order = HANDLERS if rep % 2 == 0 else HANDLERS[::-1]
            runs.append(await one_run(cluster.dsn(name), url, args.concurrency, args.jobs, order))
            admin = await connect(cluster.dsn("postgres"))
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                await admin.execute("CHECKPOINT")
            finally:
                await admin.close()
    finally:
        endpoint.terminate()
        endpoint.wait(10)
    return {
        "settings": {**settings(args.concurrency, args.jobs), "reps": args.reps},
        "median": summarise(runs, args.concurrency),
        "runs": runs,
    }


def table_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """bench/run.py's rows from its entry (one result per run): medians, and the ratio."""
    chunks = entry["runs"][0].get("settings", {}).get("chunks", 0)
    rows = [(f"{DELAY_MS:g} ms handler, one daemon, {chunks:,} chunks, chunks/s (median)", "")]
    for c in ("100", "500"):
        runs = [r[c] for r in entry["runs"] if c in r]
        if not runs:
            rows.append((f"  concurrency {c}", f"error: {entry['runs'][0].get('error')}"))
            continue
        python, http = (statistics.median(r[h]["per_second"] for r in runs) for h in HANDLERS)
        ratio = statistics.median(r["ratio"] for r in runs)
        ideal = int(c) / DELAY_MS * 1000
        target = " (target >= 0.85x)" if c == "100" else ""
        rows.append((f"  concurrency {c} (ideal {ideal:,.0f}): Python / http:",
                     f"{python:,.0f} / {http:,.0f}"))  # fmt: skip
        rows.append((f"  concurrency {c}: http: / Python{target}", f"{ratio:.2f}x"))
    return rows


def print_table(report: dict[str, Any]) -> None:
    reps = report["settings"]["reps"]
    print(f"\nchunks/s, one daemon, {report['settings']['chunks']:,} chunks, median of {reps}\n")
    heads = f"{'Python 20 ms':>14}{'http: 20 ms':>14}{'http / Python':>15}"
    print(f"{'concurrency (ideal)':<22}{heads}")
    for c, row in report["median"].items():
        ideal = int(c) / DELAY_MS * 1000
        print(f"{f'{c} ({ideal:,.0f})':<22}{row['python']:>14,.0f}{row['http']:>14,.0f}"
              f"{row['ratio']:>14.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="run once on this database (bench/run.py's mode)")
    parser.add_argument("--jobs", type=int, default=10_000, help="chunks per drain")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[100, 500])
    parser.add_argument("--reps", type=int, default=2, help="standalone: runs, medians shown")
    args = parser.parse_args()
    if args.dsn:
        print(json.dumps(asyncio.run(as_contender(args))))
        return
    cluster = PostgresCluster(fsync=True)
    cluster.start()
    try:
        report = asyncio.run(standalone(args, cluster))
    finally:
        cluster.cleanup()
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "io.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
