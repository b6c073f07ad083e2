"""Per-chunk cost of the SQL contract alone, side by side with the raw SKIP LOCKED loop.

No daemon, no handler: one connection loops claim(batch) -> complete(those) until a claim
comes back empty, on 30,000 no-op chunks in jobs of 10,000 (the perf study's workload).
chunkd is called through ``chunkd.db.Queue`` exactly as the daemon calls it (registered
worker, the daemon's default lease, its handler kinds), so this keeps measuring whatever
schema the migrations install. The raw loop is bench/peers/raw_sql_bench.py's table, index
and statements. Both run in one throwaway cluster (fsync, synchronous_commit and
full_page_writes on, as bench/run.py starts it), interleaved, order rotated each rep.

Each measured window: fresh database, CHECKPOINT, schema, load, VACUUM ANALYZE, then the
loop. The CHECKPOINT comes before the load, as in the perf study: every page the loop
touches was then first written after it (by the load), so the loop logs no full-page images
(a checkpoint right before the loop would make it log one per page it touches). The FPI
count of each window is reported to show it. Per chunk:

- server CPU µs: utime+stime of the loop's backend (pid from ``pg_backend_pid()``), read
  from /proc/<pid>/stat before and after; the preferred measure, stable where wall time
  swings with the other load on the machine;
- wall µs, and client CPU µs (this process);
- WAL bytes: ``pg_wal_lsn_diff(pg_current_wal_lsn(), start)``; WAL records and full-page
  images from ``pg_stat_wal`` (read after the loop's backend has exited and flushed them).

Ratios chunkd/raw are taken within each rep (the two windows run back to back), and the
median over reps is reported. Prints a table, then one JSON line (last line of stdout, also
written to bench/results/sql_cost.json):

    .venv/bin/python bench/sql_cost.py [--chunks 30000] [--job-size 10000] [--batch 100]
                                       [--reps 3] [--pool]

``--pool`` adds a third contender, ``chunkd_pool``: the same calls over
``chunkd.db.create_pool(size=1)``, as the daemon makes them, where asyncpg sends its reset
query (``RESET ALL`` ...) after every statement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import raw_sql_bench as raw

from chunkd import __version__
from chunkd.db import Queue, connect, create_pool
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster
from chunkd.ops.jobs import enqueue
from chunkd.runtime.supervisor import make_worker_id
from chunkd.settings import RunSettings

RESULTS = Path(__file__).resolve().parent / "results"
KIND = "bench"  # the daemon claims with its registry's kinds: here, one handler of this kind
LEASE_S = RunSettings(dsn="").lease_s  # the daemon's default lease
TICK = os.sysconf("SC_CLK_TCK")
# Cluster settings on top of PostgresCluster(fsync=True), as bench/run.py starts it:
# autovacuum off, so no vacuum worker writes WAL inside a window (each load is VACUUM
# ANALYZEd explicitly instead, as in the perf study).
CLUSTER_SETTINGS = {"autovacuum": "off"}
WAL_STATS_SQL = "SELECT wal_records, wal_fpi FROM pg_stat_wal"

Loop = Callable[[], Awaitable[int]]


def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of a process in seconds, or None where /proc cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class OneConnection:
    """What ``Queue`` uses of a pool, on exactly one connection and with nothing in between.

    A real asyncpg pool sends its reset query (``RESET ALL`` ...) after every statement; the
    contract's cost is measured without it (``--pool`` measures the daemon's pool beside it).
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn


class Window:
    """One measured loop: CPU of one backend, WAL of the cluster, wall and client CPU."""

    def __init__(self, admin: asyncpg.Connection, pid: int) -> None:
        self.admin = admin
        self.pid = pid

    async def run(self, loop: Loop, close: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        # Setup connections gone (their counters flushed), ours flushed now: the window's
        # pg_stat_wal delta is then the loop's own (and the checkpointer's, a record or two).
        await self._wait_gone(
            "pid <> $1 AND datname = (SELECT datname FROM pg_stat_activity WHERE pid = $1)"
        )
        await self.admin.execute("SELECT pg_stat_force_next_flush()")
        start_lsn = await self.admin.fetchval("SELECT pg_current_wal_lsn()")
        await self.admin.execute("SELECT pg_stat_clear_snapshot()")
        stats0 = await self.admin.fetchrow(WAL_STATS_SQL)
        cpu0 = proc_cpu_s(self.pid)
        ccpu0 = time.process_time()
        t0 = time.perf_counter()
        done = await loop()
        wall = time.perf_counter() - t0
        ccpu = time.process_time() - ccpu0
        cpu1 = proc_cpu_s(self.pid)
        wal_bytes = await self.admin.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", start_lsn
        )
        await close()  # the backend flushes its WAL counters to pg_stat_wal on exit
        await self._wait_gone("pid = $1")
        await self.admin.execute("SELECT pg_stat_clear_snapshot()")
        stats1 = await self.admin.fetchrow(WAL_STATS_SQL)
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return {
            "chunks": done,
            "seconds": round(wall, 4),
            "per_second": round(done / wall, 1),
            "server_cpu_us": round(cpu / done * 1e6, 2) if cpu is not None else None,
            "wall_us": round(wall / done * 1e6, 2),
            "client_cpu_us": round(ccpu / done * 1e6, 2),
            "wal_bytes": round(float(wal_bytes) / done, 1),
            "wal_records": round((stats1["wal_records"] - stats0["wal_records"]) / done, 2),
            "fpi": stats1["wal_fpi"] - stats0["wal_fpi"],
        }

    async def _wait_gone(self, where: str) -> None:
        """Wait until no backend matches ``where`` ($1 = the loop's backend)."""
        sql = f"SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE {where})"  # noqa: S608
        for _ in range(500):
            if not await self.admin.fetchval(sql, self.pid):
                return
            await asyncio.sleep(0.01)
        raise RuntimeError(f"backends still there: {where} ($1 = {self.pid})")


async def measure_chunkd(
    dsn: str, admin: asyncpg.Connection, opts: argparse.Namespace, *, via_pool: bool = False
) -> Any:
    setup = await connect(dsn)
    try:
        await apply_migrations(setup)
        for start in range(0, opts.chunks, opts.job_size):
            n = min(opts.job_size, opts.chunks - start)
            await enqueue(
                setup,
                kind=KIND,
                chunks=[{"i": start + i} for i in range(n)],
                payload={},
                max_concurrency=None,
                max_attempts=3,
                priority=0,
            )
        await setup.execute("VACUUM ANALYZE")
    finally:
        await setup.close()

    pool: Any
    if via_pool:
        pool = await create_pool(dsn, size=1)
        close: Callable[[], Awaitable[None]] = pool.close
    else:
        conn = await connect(dsn)
        pool, close = OneConnection(conn), conn.close
    try:
        queue = Queue(cast(asyncpg.Pool, pool))
        worker = make_worker_id()
        await queue.register_worker(
            worker, socket.gethostname(), os.getpid(), __version__, [KIND], 1
        )
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        await pool.fetchval("SELECT pg_stat_force_next_flush()")  # setup's WAL counted before
        accepted_total = 0
        claim_s = 0.0

        async def loop() -> int:
            nonlocal accepted_total, claim_s
            while True:
                t0 = time.perf_counter()
                rows = (await queue.claim(worker, opts.batch, [KIND], LEASE_S)).rows
                claim_s += time.perf_counter() - t0
                if not rows:
                    return accepted_total
                accepted = await queue.complete(
                    worker,
                    [r.id for r in rows],
                    [r.attempt for r in rows],
                    [None] * len(rows),
                )
                if len(accepted) != len(rows):
                    raise RuntimeError(f"{len(rows) - len(accepted)} completions refused")
                accepted_total += len(accepted)

        result = await Window(admin, pid).run(loop, close)
    except BaseException:
        await close()
        raise
    result["claim_wall_us"] = round(claim_s / max(1, result["chunks"]) * 1e6, 2)
    check = await connect(dsn)
    try:
        left = await Queue(cast(asyncpg.Pool, OneConnection(check))).queue_depth()
    finally:
        await check.close()
    if result["chunks"] != opts.chunks or any(left.values()):
        raise RuntimeError(f"chunkd: {result['chunks']} completed of {opts.chunks}, left {left}")
    return result


async def measure_raw(dsn: str, admin: asyncpg.Connection, opts: argparse.Namespace) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        await raw.prepare_table(conn, opts.chunks)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.fetchval("SELECT pg_stat_force_next_flush()")
        claim_s = 0.0

        async def loop() -> int:
            nonlocal claim_s
            done = 0
            while True:
                t0 = time.perf_counter()
                ids = [r["id"] for r in await conn.fetch(raw.CLAIM_SQL, opts.batch)]
                claim_s += time.perf_counter() - t0
                if not ids:
                    return done
                await conn.execute(raw.DONE_SQL, ids)
                done += len(ids)

        result = await Window(admin, pid).run(loop, conn.close)
    finally:
        await conn.close()
    result["claim_wall_us"] = round(claim_s / max(1, result["chunks"]) * 1e6, 2)
    check = await asyncpg.connect(dsn)
    try:
        recorded = await check.fetchval(raw.DONE_COUNT_SQL)
    finally:
        await check.close()
    if result["chunks"] != opts.chunks or recorded != opts.chunks:
        raise RuntimeError(f"raw: loop {result['chunks']}, table {recorded}, of {opts.chunks}")
    return result


async def measure_chunkd_pool(dsn: str, admin: asyncpg.Connection, opts: argparse.Namespace) -> Any:
    return await measure_chunkd(dsn, admin, opts, via_pool=True)


Measure = Callable[[str, asyncpg.Connection, argparse.Namespace], Awaitable[Any]]


def contenders(opts: argparse.Namespace) -> dict[str, Measure]:
    chosen: dict[str, Measure] = {"chunkd": measure_chunkd, "raw": measure_raw}
    if opts.pool:
        chosen["chunkd_pool"] = measure_chunkd_pool
    return chosen


def settings(opts: argparse.Namespace) -> dict[str, Any]:
    return {
        "chunks": opts.chunks,
        "job_size": opts.job_size,
        "batch": opts.batch,
        "reps": opts.reps,
        "connections": 1,
        "transactions": "autocommit: one per statement, 2 per batch",
        "chunkd": {
            "api": "chunkd.db.Queue.claim / Queue.complete (the daemon's queue API)",
            "via": "one chunkd.db.connect() connection, no pool reset",
            "worker": "registered with Queue.register_worker, as the daemon does",
            "kinds": [KIND],
            "lease_s": LEASE_S,
            "results": "None (no-op handler)",
            "schema": "chunkd.db.migrate.apply_migrations",
        },
        **(
            {
                "chunkd_pool": "as chunkd, via chunkd.db.create_pool(size=1):"
                " asyncpg's reset query after each statement"
            }
            if opts.pool
            else {}
        ),
        "raw": {
            "sql": "bench/peers/raw_sql_bench.py SCHEMA_SQL, CLAIM_SQL, DONE_SQL",
            "pending_index": "partial btree (id) WHERE status = 'pending'",
        },
        "cluster": "fsync=on, synchronous_commit=on, full_page_writes=on, autovacuum=off",
        "window": "fresh database, CHECKPOINT, schema, load, VACUUM ANALYZE, then the loop",
    }


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


async def measure(cluster: PostgresCluster, opts: argparse.Namespace) -> dict[str, Any]:
    chosen = contenders(opts)
    names = list(chosen)
    admin = await asyncpg.connect(cluster.dsn("postgres"))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    # Per rep, each contender over the raw loop of the same rep.
    ratios = {name: {"server_cpu": [], "wall": []} for name in names if name != "raw"}
    counter = 0
    try:
        for rep in range(opts.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                counter += 1
                db = f"sql_cost_{counter}"
                await admin.execute(f'CREATE DATABASE "{db}"')
                await admin.execute("CHECKPOINT")  # before the load: see the module docstring
                try:
                    result = await chosen[name](cluster.dsn(db), admin, opts)
                finally:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                result["rep"] = rep + 1
                runs[name].append(result)
                print(
                    f"  rep {rep + 1} {name:<11} {result['per_second']:>9,.0f}/s  "
                    f"server CPU {result['server_cpu_us']} µs  WAL {result['wal_bytes']} B  "
                    f"FPI {result['fpi']}",
                    file=sys.stderr,
                    flush=True,
                )
            r = runs["raw"][-1]
            for name, acc in ratios.items():
                c = runs[name][-1]
                if c["server_cpu_us"] is not None and r["server_cpu_us"]:
                    acc["server_cpu"].append(c["server_cpu_us"] / r["server_cpu_us"])
                acc["wall"].append(c["wall_us"] / r["wall_us"])
        server_version = await admin.fetchval("SELECT current_setting('server_version')")
    finally:
        await admin.close()
    keys = ("server_cpu_us", "wall_us", "client_cpu_us", "claim_wall_us", "wal_bytes")
    summary = {n: {k: _median(rs, k) for k in (*keys, "wal_records")} for n, rs in runs.items()}
    for name, rs in runs.items():
        summary[name]["fpi_max"] = max(r["fpi"] for r in rs)
    over_raw = {}
    for name, acc in ratios.items():
        ratio = {k: round(statistics.median(v), 3) if v else None for k, v in acc.items()}
        # The figure the target is about: server CPU where it could be read, else wall time.
        basis = "server_cpu" if ratio["server_cpu"] is not None else "wall"
        over_raw[name] = {
            **ratio,
            "basis": basis,
            "value": ratio[basis],
            "per_rep": {k: [round(x, 3) for x in v] for k, v in acc.items()},
        }
    return {
        "scenario": "sql_cost",
        "settings": settings(opts),
        "per_chunk_median": summary,
        "ratio_chunkd_over_raw": over_raw["chunkd"],
        "ratio_over_raw": over_raw,
        "runs": runs,
        "server_version": server_version,
        "versions": {"python": platform.python_version(), "asyncpg": asyncpg.__version__},
        "event_loop": _loop_name(),
        "host": {"cpus": os.cpu_count(), "loadavg_1m_before": round(os.getloadavg()[0], 2)},
    }


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    med = report["per_chunk_median"]
    lines = [
        f"SQL cost per chunk: {s['chunks']:,} no-op chunks (jobs of {s['job_size']:,}), "
        f"batch {s['batch']}, 1 connection, median of {s['reps']} reps",
        "",
        f"{'':<18}{'server CPU µs':>15}{'wall µs':>10}{'client CPU µs':>15}"
        f"{'WAL B':>9}{'WAL rec':>9}{'FPI max':>9}",
    ]
    for name, m in med.items():
        lines.append(
            f"{name:<18}{_fmt(m['server_cpu_us']):>15}{_fmt(m['wall_us']):>10}"
            f"{_fmt(m['client_cpu_us']):>15}{_fmt(m['wal_bytes'], '{:.0f}'):>9}"
            f"{_fmt(m['wal_records']):>9}{m['fpi_max']:>9}"
        )
    raw_wal = med["raw"]["wal_bytes"]
    for name, ratio in report["ratio_over_raw"].items():
        wal = med[name]["wal_bytes"] / raw_wal if med[name]["wal_bytes"] and raw_wal else None
        lines.append(
            f"{name + '/raw':<18}{_fmt(ratio['server_cpu'], '{:.2f}x'):>15}"
            f"{_fmt(ratio['wall'], '{:.2f}x'):>10}{'':>15}{_fmt(wal, '{:.2f}x'):>9}"
        )
    ratio = report["ratio_chunkd_over_raw"]
    lines.append(
        f"\nchunkd/raw on {ratio['basis'].replace('_', ' ')}: {_fmt(ratio['value'], '{:.2f}x')}"
        f" (target <= 1.7x); per rep: {ratio['per_rep'][ratio['basis']]}"
    )
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run(coro: Any) -> Any:
    if _loop_name() == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=30_000)
    parser.add_argument("--job-size", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--pool",
        action="store_true",
        help="also measure chunkd over chunkd.db.create_pool(size=1), as the daemon calls it "
        "(asyncpg's reset query after every statement)",
    )
    opts = parser.parse_args()
    cluster = PostgresCluster(fsync=True, extra_settings=CLUSTER_SETTINGS)
    cluster.start()
    started = time.monotonic()
    try:
        report = _run(measure(cluster, opts))
    finally:
        cluster.cleanup()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sql_cost.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
