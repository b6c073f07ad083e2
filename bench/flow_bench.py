"""Flow control measured with real ``chunkd run`` daemons: the figures of docs/flow-control.md.

One throwaway cluster (fsync on), a fresh database per scenario, daemons as subprocesses
(``--handler bench=bench_handlers:...``), every figure read from what the database recorded:

- ``kind_rate``: a kind limited to 20/s (default burst), 3 daemons of concurrency 16, 600
  chunks of 10 ms: completions per second over every 5 s window (step 50 ms), and the claim
  statements the daemons issued (calls of ``chunkd.claim_or_wait``, counted by the server with
  ``track_functions = 'pl'``) per second of the run;
- ``job_rate``: 2 daemons of concurrency 8, 10 ms chunks: an unlimited job of 2,000 alone, then
  a job limited to 5/s (60 chunks) beside another unlimited job of 2,000: the unlimited job's
  throughput alone and beside, the limited job's rate and its most claims in any 1 s;
- ``key``: a concurrency key limited to 2 shared by 5 jobs of 6 chunks of 200 ms, a key limited
  to 4 with one job of 8, 2 daemons of concurrency 4: the most chunks of each key in flight at
  once, and how busy the first key's 2 slots were from its first claim to its last end;
- ``resume``: 3 daemons of concurrency 4 run a job of 50 ms chunks; 5 times: pause, wait for the
  chunks in flight to land, resume; the time from the resume to the next claim;
- ``slow_path``: what a claim costs on the server when flow control is in use: one connection
  claims 50 and completes them, until 3,000 are done, among 10, 100 or 1,000 unfinished jobs
  of 20 chunks under a (never reached) kind rate, job rate or concurrency key, and without any
  flow control; server CPU of the backend (``/proc``) per claim+complete.

    .venv/bin/python bench/flow_bench.py [--scenario NAME ...]

Prints a table, then one JSON line (also written to bench/results/flow.json).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ONE_S = timedelta(seconds=1)
Conn = Any


async def _until(check: Callable[[], Awaitable[Any]], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("a benchmark step did not finish in time")
        await asyncio.sleep(0.02)


def _daemons(dsn: str, count: int, handler: str, concurrency: int) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, CHUNKD_DSN=dsn, PYTHONPATH=str(BENCH))
    command = [sys.executable, "-m", "chunkd.cli", "--log-level", "warning", "run"]
    command += ["--handler", f"bench=bench_handlers:{handler}", "--concurrency", str(concurrency)]
    return [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(count)]


def _stop(daemons: list[subprocess.Popen[bytes]]) -> None:
    for d in daemons:
        d.terminate()
    for d in daemons:
        d.wait(60)


async def _job(conn: Conn, n: int, sleep_s: float, **flow: Any) -> Any:
    chunks = json.dumps([{"sleep_s": sleep_s}] * n)
    return await conn.fetchval(
        "SELECT chunkd.create_sync_job('bench', $1::jsonb, max_per_second => $2,"
        " concurrency_key => $3)",
        chunks,
        flow.get("max_per_second"),
        flow.get("concurrency_key"),
    )


async def _done(conn: Conn, job: Any) -> bool:
    return await conn.fetchval(
        "SELECT finished_at IS NOT NULL FROM chunkd.jobs WHERE public_id = $1", job
    )


async def _attempts(conn: Conn, job: Any) -> list[Any]:
    return await conn.fetch(
        "SELECT a.claimed_at, a.ended_at FROM chunkd.attempts a JOIN chunkd.jobs j"
        " ON j.id = a.job_id WHERE j.public_id = $1 ORDER BY a.claimed_at",
        job,
    )


def _s(a: Any, b: Any) -> float:
    return float((b - a).total_seconds())


def _peak(rows: list[Any]) -> int:
    edges = sorted([(r["claimed_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows])
    return max(itertools.accumulate(d for _, d in edges))


async def kind_rate(conn: Conn, dsn: str, name: str) -> dict[str, Any]:
    await conn.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
    await conn.execute("SELECT chunkd.set_rate_limit('bench', 20)")
    daemons = _daemons(dsn, 3, "sleep10", 16)
    calls = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE funcname = 'claim_or_wait'"
    )
    try:
        await _until(lambda: _count(conn, "SELECT count(*) = 3 FROM chunkd.workers"))
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        before = await conn.fetchval(calls)
        started = await conn.fetchval("SELECT clock_timestamp()")
        job = await _job(conn, 600, 0.01)
        await _until(lambda: _done(conn, job))
    finally:
        _stop(daemons)
    await _until(lambda: _count(conn, _OTHERS_GONE))
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    claims = int(await conn.fetchval(calls) - before)
    ends = sorted(r["ended_at"] for r in await _attempts(conn, job))
    offsets = [_s(ends[0], e) for e in ends]
    windows = [
        (bisect.bisect_left(offsets, lo + 5) - bisect.bisect_left(offsets, lo)) / 5
        for lo in (i * 0.05 for i in range(int((offsets[-1] - 5) / 0.05) + 1))
    ]
    run_s = _s(started, ends[-1])
    return {
        "limit": "20/s, default burst 7",
        "daemons": "3 x concurrency 16",
        "chunks": 600,
        "run_s": round(run_s, 1),
        "rate_per_s": round(600 / _s(ends[0], ends[-1]), 2),
        "window_5s_min_per_s": min(windows),
        "window_5s_max_per_s": max(windows),
        "claim_statements": claims,
        "claim_statements_per_s": round(claims / run_s, 2),
        "chunks_per_claim": round(600 / claims, 1),
    }


_OTHERS_GONE = (
    "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid())"
)


async def _count(conn: Conn, sql: str, *args: Any) -> Any:
    return await conn.fetchval(sql, *args)


async def job_rate(conn: Conn, dsn: str, name: str) -> dict[str, Any]:
    daemons = _daemons(dsn, 2, "sleep10", 8)

    async def throughput(job: Any) -> float:
        rows = await _attempts(conn, job)
        return len(rows) / _s(rows[0]["claimed_at"], max(r["ended_at"] for r in rows))

    try:
        await _until(lambda: _count(conn, "SELECT count(*) = 2 FROM chunkd.workers"))
        alone = await _job(conn, 2000, 0.01)
        await _until(lambda: _done(conn, alone))
        limited = await _job(conn, 60, 0.01, max_per_second=5)
        beside = await _job(conn, 2000, 0.01)
        await _until(lambda: _done(conn, beside))
        await _until(lambda: _done(conn, limited))
    finally:
        _stop(daemons)
    claims = [r["claimed_at"] for r in await _attempts(conn, limited)]
    in_one_s = max(bisect.bisect_right(claims, c + ONE_S) - i for i, c in enumerate(claims))
    return {
        "limit": "5/s on one job (default burst 2)",
        "daemons": "2 x concurrency 8",
        "unlimited_alone_per_s": round(await throughput(alone), 1),
        "unlimited_beside_per_s": round(await throughput(beside), 1),
        "limited_rate_per_s": round((len(claims) - 2) / _s(claims[0], claims[-1]), 2),
        "limited_most_claims_in_1s": in_one_s,
    }


async def key(conn: Conn, dsn: str, name: str) -> dict[str, Any]:
    await conn.execute("SELECT chunkd.set_concurrency_limit('tenant-a', 2)")
    await conn.execute("SELECT chunkd.set_concurrency_limit('tenant-b', 4)")
    shared = [await _job(conn, 6, 0.2, concurrency_key="tenant-a") for _ in range(5)]
    other = await _job(conn, 8, 0.2, concurrency_key="tenant-b")
    daemons = _daemons(dsn, 2, "sleep_payload", 4)
    try:
        for job in (*shared, other):
            await _until(lambda job=job: _done(conn, job))
    finally:
        _stop(daemons)
    a = [r for job in shared for r in await _attempts(conn, job)]
    b = await _attempts(conn, other)
    span = _s(min(r["claimed_at"] for r in a), max(r["ended_at"] for r in a))
    busy = sum(_s(r["claimed_at"], r["ended_at"]) for r in a)
    return {
        "limits": "tenant-a 2 (5 jobs x 6 chunks of 200 ms), tenant-b 4 (1 job x 8)",
        "daemons": "2 x concurrency 4",
        "tenant_a_peak": _peak(a),
        "tenant_a_slots_busy": round(busy / (2 * span), 3),
        "tenant_a_span_s": round(span, 2),
        "tenant_a_ideal_s": round(30 * 0.2 / 2, 2),
        "tenant_b_peak": _peak(b),
        "tenant_b_done_before_a_s": round(
            _s(max(r["ended_at"] for r in b), max(r["ended_at"] for r in a)), 2
        ),
    }


async def resume(conn: Conn, dsn: str, name: str) -> dict[str, Any]:
    daemons = _daemons(dsn, 3, "sleep_payload", 4)
    latencies = []
    try:
        await _until(lambda: _count(conn, "SELECT count(*) = 3 FROM chunkd.workers"))
        job = await _job(conn, 2000, 0.05)
        for _ in range(5):
            await asyncio.sleep(0.3)  # let it run a little between pauses (not a measurement)
            await conn.execute("SELECT chunkd.pause_sync_job($1)", job)
            await _until(lambda: _count(conn, _IDLE))
            at = await conn.fetchval(
                "SELECT clock_timestamp() FROM (SELECT chunkd.resume_sync_job($1)) r", job
            )
            await _until(lambda at=at: _count(conn, _CLAIMED_SINCE, at))
            first = await conn.fetchval(
                "SELECT min(claimed_at) FROM chunkd.attempts WHERE claimed_at > $1", at
            )
            latencies.append(_s(at, first) * 1000)
    finally:
        _stop(daemons)
    return {
        "daemons": "3 x concurrency 4, idle when resumed",
        "resumes": len(latencies),
        "resume_to_claim_ms_median": round(statistics.median(latencies), 1),
        "resume_to_claim_ms_max": round(max(latencies), 1),
    }


_IDLE = "SELECT NOT EXISTS (SELECT 1 FROM chunkd.attempts WHERE ended_at IS NULL)"


_CLAIMED_SINCE = "SELECT EXISTS (SELECT 1 FROM chunkd.attempts WHERE claimed_at > $1)"


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def slow_path(conn: Conn, dsn: str, name: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for jobs in (10, 100, 1000):
        for mode in ("none", "kind_rate", "job_rate", "key"):
            await conn.execute(
                "TRUNCATE chunkd.jobs, chunkd.kind_flow, chunkd.concurrency_limits CASCADE"
            )
            if mode == "kind_rate":
                await conn.execute("SELECT chunkd.set_rate_limit('bench', 1000000, 1000000)")
            if mode == "key":
                await conn.execute("SELECT chunkd.set_concurrency_limit('t', 1000000)")
            for _ in range(jobs):
                await _job(
                    conn,
                    20,
                    0,
                    max_per_second=1_000_000 if mode == "job_rate" else None,
                    concurrency_key="t" if mode == "key" else None,
                )
            await conn.execute("VACUUM ANALYZE")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            claims = done = 0
            cpu0 = _cpu_s(pid)
            while done < 3000:
                rows = await conn.fetch(
                    "SELECT id, attempt FROM chunkd.claim_or_wait('w', 50, NULL, 60)"
                    " WHERE id IS NOT NULL"
                )
                claims += 1
                if not rows:
                    break
                await conn.fetch(
                    "SELECT chunkd.complete_attempts('w', $1, $2)",
                    [r["id"] for r in rows],
                    [r["attempt"] for r in rows],
                )
                done += len(rows)
            results[f"{jobs}_jobs_{mode}_ms"] = round((_cpu_s(pid) - cpu0) / claims * 1000, 1)
    return {"per": "claim of 50 + their completion, server CPU", **results}


SCENARIOS = {
    "kind_rate": kind_rate,
    "job_rate": job_rate,
    "key": key,
    "resume": resume,
    "slow_path": slow_path,
}


async def measure(cluster: PostgresCluster, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    admin = await connect(cluster.dsn("postgres"))
    try:
        for i, scenario in enumerate(names):
            name = f"flow_{i}"
            await admin.execute(f'CREATE DATABASE "{name}"')
            conn = await connect(cluster.dsn(name))
            try:
                await apply_migrations(conn)
                results[scenario] = await SCENARIOS[scenario](conn, cluster.dsn(name), name)
            finally:
                await conn.close()
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            print(f"  {scenario}: {results[scenario]}", file=sys.stderr, flush=True)
    finally:
        await admin.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    opts = parser.parse_args()
    cluster = PostgresCluster(fsync=True)
    cluster.start()
    started = time.monotonic()
    try:
        results = asyncio.run(measure(cluster, opts.scenario or list(SCENARIOS)))
    finally:
        cluster.cleanup()
    report = {
        "scenario": "flow",
        "results": results,
        "host": {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2)},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    for scenario, figures in results.items():
        print(scenario)
        for k, v in figures.items():
            print(f"  {k:<28} {v}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flow.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
