"""The side-by-side benchmark: chunkd vs PGQueuer vs Procrastinate vs a raw SQL loop.

One command, one throwaway cluster (fsync on, synchronous_commit on), a fresh database per
run, every measurement repeated (min/median reported), one table with ratios at the end:

    python bench/run.py            # about 10 minutes on 2 cores
    python bench/run.py --quick    # fewer jobs, one repeat: a smoke test of the harness

Rows:

- SQL contract alone: bench/sql_cost.py as a sub-step (its own throwaway cluster, started and
  removed before this one starts): chunkd's claim+complete through ``chunkd.db.Queue`` vs the
  raw loop, per chunk, server CPU / wall / WAL bytes, and the ratios;
- no-op throughput, and the same with a **held snapshot**: another session connected to the
  run's database holds ``BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;`` open from before
  the contender installs its schema until its run is over, so no row that dies during the run
  can be vacuumed. chunkd and PGQueuer (best settings), each as a ratio of its own clean run;
  the clean and held runs are interleaved (order rotated each rep) and the ratio is taken
  within each rep, median over reps;
- tracing off: chunkd's no-op throughput with the ``[otel]`` extra installed and no exporter
  configured (the run above) beside a run as if it were not installed (``chunkd_bench.py
  --no-otel``), interleaved with it;
- the daemon on another host: bench/remote_bench.py as a sub-step (its own cluster), chunkd's
  no-op and latency scenarios with the daemon's connections through bench/delay_proxy.py at
  1 ms each way and at 0 ms, and over plain loopback TCP, each beside the direct figure;
- 10 ms handler, latency, and chunkd-only rows (claim cost, processes, memory, the ``http:``
  handler against a Python handler of the same 20 ms: bench/io_bench.py, and enqueue through
  the Python client: bench/enqueue_bench.py).

The peers are installed from PyPI into their own venv (bench/peers/requirements.txt), never
into the project's. Results are also written to bench/results/latest.json.
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
import time
from pathlib import Path
from typing import Any

from io_bench import table_rows as io_rows

from chunkd.db import connect
from chunkd.demo.cluster import PostgresCluster

BENCH = Path(__file__).resolve().parent
PEER_VENV = Path(os.environ.get("CHUNKD_BENCH_PEER_VENV", "/tmp/chunkd-bench-venv"))
RESULTS = BENCH / "results"
HOLD_SNAPSHOT_SQL = "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;"
HELD_SNAPSHOT_NOTE = (
    f"another session in the same database runs {HOLD_SNAPSHOT_SQL!r} before the contender's "
    "schema is installed and keeps it open until the run is over: no dead row can be vacuumed"
)
SNAPSHOT_XMIN_SQL = "SELECT backend_xmin, state FROM pg_stat_activity WHERE pid = $1"


def peer_python() -> str:
    """The peers' venv, created and filled on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(BENCH / "peers" / "requirements.txt"),
        ],
        check=True,
    )
    return str(python)


class Bench:
    def __init__(self, cluster: PostgresCluster, peer_python: str, repeats: int) -> None:
        self.cluster = cluster
        self.peer_python = peer_python
        self.repeats = repeats
        self.counter = 0
        self.results: list[dict[str, Any]] = []

    async def fresh_db(self) -> str:
        self.counter += 1
        name = f"bench_{self.counter}"
        admin = await connect(self.cluster.dsn("postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return self.cluster.dsn(name)

    async def drop_db(self, dsn: str) -> None:
        name = dsn.split("/")[3].split("?")[0]
        admin = await connect(self.cluster.dsn("postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute("CHECKPOINT")  # the next run does not pay for this one's dirt
        finally:
            await admin.close()

    async def run_one(
        self, label: str, script: str, python: str, *args: str, hold_snapshot: bool = False
    ) -> dict[str, Any]:
        dsn = await self.fresh_db()
        holder = None
        held: dict[str, Any] = {}
        try:
            if hold_snapshot:
                holder = await connect(dsn, application_name="chunkd-bench-snapshot-holder")
                held = await self._hold_snapshot(holder)
            proc = await asyncio.create_subprocess_exec(
                python,
                str(BENCH / script),
                "--dsn",
                dsn,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await proc.communicate()
            if holder is not None:
                held = await self._check_snapshot(holder, held)
        finally:
            if holder is not None:
                await holder.close()
            await self.drop_db(dsn)
        lines = out.decode().strip().splitlines()
        result = (
            json.loads(lines[-1]) if lines else {"error": f"no output (exit {proc.returncode})"}
        )
        if hold_snapshot:
            result["held_snapshot"] = held
            if isinstance(result.get("settings"), dict):
                result["settings"]["held_snapshot"] = HELD_SNAPSHOT_NOTE
            if not held.get("held_to_end") and "error" not in result:
                result = {"error": f"snapshot not held for the whole run: {held}"}
        result["label"] = label
        status = result.get("error") or result.get("per_second") or result.get("ratio")
        print(f"  {label:<34} {status}", file=sys.stderr, flush=True)
        return result

    async def _hold_snapshot(self, holder: Any) -> dict[str, Any]:
        """Open the REPEATABLE READ transaction; its snapshot now holds the xmin horizon."""
        await holder.execute(HOLD_SNAPSHOT_SQL)
        return await self._snapshot_state(holder.get_server_pid())

    async def _check_snapshot(self, holder: Any, before: dict[str, Any]) -> dict[str, Any]:
        """Still idle in the same transaction, with the same xmin, after the run?"""
        after = await self._snapshot_state(holder.get_server_pid())
        held = (
            before["backend_xmin"] is not None
            and after["backend_xmin"] == before["backend_xmin"]
            and after["state"] == "idle in transaction"
        )
        return {**before, "state_after": after["state"], "held_to_end": held}

    async def _snapshot_state(self, pid: int) -> dict[str, Any]:
        # Read from another session: pg_stat_activity is cached inside the holder's transaction.
        admin = await connect(self.cluster.dsn("postgres"))
        try:
            row = await admin.fetchrow(SNAPSHOT_XMIN_SQL, pid)
        finally:
            await admin.close()
        xmin = row["backend_xmin"] if row else None
        return {"backend_xmin": str(xmin) if xmin else None, "state": row["state"] if row else None}

    async def measure(self, label: str, script: str, python: str, *args: str) -> dict[str, Any]:
        runs = [await self.run_one(label, script, python, *args) for _ in range(self.repeats)]
        entry = {"label": label, "runs": runs}
        self.results.append(entry)
        return entry

    async def measure_interleaved(
        self, specs: list[tuple[str, str, str, list[str], bool]], repeats: int
    ) -> list[dict[str, Any]]:
        """Every spec once per rep, the order rotated each rep, so each meets the same noise.

        A spec is (label, script, python, args, hold_snapshot). Entries come back in spec order.
        """
        entries = [{"label": spec[0], "runs": []} for spec in specs]
        for rep in range(repeats):
            order = list(range(len(specs)))
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for i in order:
                label, script, python, args, hold = specs[i]
                result = await self.run_one(label, script, python, *args, hold_snapshot=hold)
                result["rep"] = rep + 1
                entries[i]["runs"].append(result)
        self.results.extend(entries)
        return entries

    async def sql_cost(self, quick: bool) -> dict[str, Any]:
        """bench/sql_cost.py as a sub-step; it starts and removes its own throwaway cluster."""
        label = "SQL contract vs raw loop (sql_cost.py)"
        args = ["--chunks", "5000", "--reps", "2"] if quick else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "sql_cost.py"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        lines = out.decode().strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"error": f"no JSON output (exit {proc.returncode})"}
        result["label"] = label
        ratio = result.get("ratio_chunkd_over_raw", {}).get("value")
        print(f"  {label:<34} {result.get('error') or ratio}", file=sys.stderr, flush=True)
        entry = {"label": label, "runs": [result]}
        self.results.append(entry)
        return entry

    async def remote(self, quick: bool) -> dict[str, Any]:
        """bench/remote_bench.py as a sub-step (the daemon through a 1 ms each-way proxy);
        it starts and removes its own throwaway cluster."""
        label = "daemon on another host (remote_bench.py)"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "remote_bench.py"),
            *(["--quick"] if quick else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        lines = out.decode().strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"error": f"no JSON output (exit {proc.returncode})"}
        result["label"] = label
        ratio = result.get("noop", {}).get("proxy1", {}).get("ratio_to_direct")
        print(f"  {label:<34} {result.get('error') or ratio}", file=sys.stderr, flush=True)
        entry = {"label": label, "runs": [result]}
        self.results.append(entry)
        return entry


def _values(entry: dict[str, Any], key: str) -> list[float]:
    return [r[key] for r in entry["runs"] if isinstance(r.get(key), int | float)]


def _min_med(entry: dict[str, Any], key: str, fmt: str = "{:,.0f}") -> str:
    values = _values(entry, key)
    if not values:
        errors = {r.get("error") for r in entry["runs"]}
        return f"error: {errors}"
    return f"{fmt.format(min(values))} / {fmt.format(statistics.median(values))}"


def _median(entry: dict[str, Any], key: str) -> float:
    values = _values(entry, key)
    return statistics.median(values) if values else float("nan")


def _paired_ratios(
    held: dict[str, Any], clean: dict[str, Any], key: str = "per_second"
) -> list[float]:
    """held / clean within each rep (the two ran in the same rotation)."""
    clean_by_rep = {r.get("rep"): r.get(key) for r in clean["runs"]}
    return [
        r[key] / clean_by_rep[r.get("rep")]
        for r in held["runs"]
        if isinstance(r.get(key), int | float) and clean_by_rep.get(r.get("rep"))
    ]


def _median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _sql_cost_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    report = entry["runs"][0]
    if "error" in report:
        return [("SQL contract alone (bench/sql_cost.py)", f"error: {report['error']}")]
    s, med = report["settings"], report["per_chunk_median"]
    ratio = report["ratio_chunkd_over_raw"]

    def cells(name: str) -> str:
        m = med[name]
        cpu = "n/a" if m["server_cpu_us"] is None else f"{m['server_cpu_us']:.1f}"
        return f"{cpu} / {m['wall_us']:.1f} / {m['wal_bytes']:,.0f}"

    cpu_ratio = "n/a" if ratio["server_cpu"] is None else f"{ratio['server_cpu']:.2f}x"
    per_rep = ", ".join(f"{x:.2f}" for x in ratio["per_rep"]["server_cpu"]) or "n/a"
    return [
        (f"SQL alone per chunk, batch {s['batch']}, 1 conn (sql_cost.py)", ""),
        ("  chunkd: server CPU µs / wall µs / WAL B", cells("chunkd")),
        ("  raw loop: server CPU µs / wall µs / WAL B", cells("raw")),
        ("  chunkd / raw, server CPU (target <= 1.7x)", f"{cpu_ratio} (per rep {per_rep})"),
        ("  chunkd / raw, wall", f"{ratio['wall']:.2f}x"),
        (
            "  chunkd / raw, WAL bytes",
            f"{med['chunkd']['wal_bytes'] / med['raw']['wal_bytes']:.2f}x",
        ),
    ]


def _remote_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    report = entry["runs"][0]
    if "error" in report:
        return [("daemon on another host (remote_bench.py)", f"error: {report['error']}")]
    noop, lat = report["noop"], report["latency"]
    direct, direct_lat = noop["direct"]["per_second_median"], lat["direct"]

    def through(variant: str) -> str:
        n = noop[variant]
        return f"{n['per_second_median']:,.0f} ({n['ratio_to_direct']:.2f}x direct)"

    def latency(variant: str) -> str:
        v = lat[variant]
        return (
            f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f} (p50 {v['p50_ms'] - direct_lat['p50_ms']:+.2f}"
            f" ms vs direct)"
        )

    return [
        ("daemon <-> PostgreSQL through bench/delay_proxy.py (remote_bench.py)", ""),
        ("  no-op jobs/s, direct (unix socket), median", f"{direct:,.0f}"),
        ("  no-op through the proxy at 0 ms", through("proxy0")),
        ("  no-op over loopback TCP, no proxy", through("tcp")),
        ("  no-op through a 1 ms each-way proxy (target >= 0.8x)", through("proxy1")),
        (
            "  latency at 200/s, ms p50 / p99, direct",
            f"{direct_lat['p50_ms']:.2f} / {direct_lat['p99_ms']:.2f}",
        ),
        ("  the same through the proxy at 0 ms", latency("proxy0")),
        ("  the same through a 1 ms proxy (target p50 <= +4 ms)", latency("proxy1")),
    ]


async def main(args: argparse.Namespace) -> int:
    jobs = {"noop": 20_000, "sleep10": 10_000, "peer_slow": 5_000, "processes": 10_000}
    if args.quick:
        jobs = {"noop": 3_000, "sleep10": 2_000, "peer_slow": 1_000, "processes": 2_000}
    duration = "3" if args.quick else "10"
    repeats = 1 if args.quick else 2
    # The no-op block (clean and held-snapshot runs, interleaved): 3 reps for a real median.
    noop_repeats = 1 if args.quick else 3
    python = peer_python()
    me = sys.executable
    cluster = PostgresCluster(fsync=True)
    started = time.monotonic()
    try:
        b = Bench(cluster, python, repeats)
        print("SQL contract alone (its own cluster)", file=sys.stderr)
        sql_cost = await b.sql_cost(args.quick)
        print("daemon on another host (its own cluster)", file=sys.stderr)
        remote = await b.remote(args.quick)
        cluster.start()
        print("no-op throughput, clean and with a held snapshot, interleaved", file=sys.stderr)
        noop_args = ["--scenario", "noop", "--jobs", str(jobs["noop"])]
        pgq_args = [*noop_args, "--settings", "best"]
        no_otel_args = [*noop_args, "--no-otel"]
        chunkd_noop, chunkd_held, pgq_best, pgq_held, chunkd_no_otel = await b.measure_interleaved(
            [
                ("chunkd no-op", "chunkd_bench.py", me, noop_args, False),
                ("chunkd no-op, held snapshot", "chunkd_bench.py", me, noop_args, True),
                ("pgqueuer no-op (best)", "peers/pgqueuer_bench.py", python, pgq_args, False),
                (
                    "pgqueuer no-op (best), held snapshot",
                    "peers/pgqueuer_bench.py",
                    python,
                    pgq_args,
                    True,
                ),
                # The [otel] extra's cost when tracing is off: the run above has it installed
                # and no exporter configured; this one runs as if it were not installed.
                ("chunkd no-op, without opentelemetry", "chunkd_bench.py", me, no_otel_args, False),
            ],
            noop_repeats,
        )
        pgq_default = await b.measure(
            "pgqueuer no-op (default)",
            "peers/pgqueuer_bench.py",
            python,
            "--scenario",
            "noop",
            "--settings",
            "default",
            "--jobs",
            str(jobs["noop"]),
        )
        proc_noop = await b.measure(
            "procrastinate no-op",
            "peers/procrastinate_bench.py",
            python,
            "--scenario",
            "noop",
            "--jobs",
            str(jobs["peer_slow"]),
        )
        ceiling = await b.measure(
            "raw SQL ceiling (100/stmt)", "peers/raw_sql_bench.py", python, "--scenario", "ceiling"
        )
        print("10 ms handler, concurrency 50", file=sys.stderr)
        chunkd_sleep = await b.measure(
            "chunkd 10 ms",
            "chunkd_bench.py",
            me,
            "--scenario",
            "sleep10",
            "--jobs",
            str(jobs["sleep10"]),
        )
        pgq_sleep = await b.measure(
            "pgqueuer 10 ms",
            "peers/pgqueuer_bench.py",
            python,
            "--scenario",
            "sleep10",
            "--jobs",
            str(jobs["sleep10"]),
        )
        proc_sleep = await b.measure(
            "procrastinate 10 ms",
            "peers/procrastinate_bench.py",
            python,
            "--scenario",
            "sleep10",
            "--jobs",
            str(jobs["peer_slow"]),
        )
        print("latency at 200/s", file=sys.stderr)
        chunkd_lat = await b.measure(
            "chunkd latency", "chunkd_bench.py", me, "--scenario", "latency", "--duration", duration
        )
        pgq_lat = await b.measure(
            "pgqueuer latency",
            "peers/pgqueuer_bench.py",
            python,
            "--scenario",
            "latency",
            "--duration",
            duration,
        )
        print("chunkd only: claim cost, processes, memory", file=sys.stderr)
        if args.quick:
            os.environ["CHUNKD_BENCH_HISTORY"] = "50000"
        claim = await b.measure(
            "chunkd claim cost 1M vs empty", "chunkd_bench.py", me, "--scenario", "claim_cost"
        )
        procs = await b.measure(
            "chunkd 1/2/4 processes",
            "chunkd_bench.py",
            me,
            "--scenario",
            "processes",
            "--jobs",
            str(jobs["processes"]),
        )
        rss = await b.measure(
            "chunkd RSS 20k vs 200k",
            "chunkd_bench.py",
            me,
            "--scenario",
            "rss",
            *(["--jobs", "40000"] if args.quick else []),
        )
        print("chunkd only: http: handler vs a Python handler, 20 ms each", file=sys.stderr)
        io = await b.measure(
            "chunkd http: vs Python handler",
            "io_bench.py",
            me,
            *(["--jobs", "2000"] if args.quick else []),
        )
        print("chunkd only: enqueue", file=sys.stderr)
        enqueue = await b.measure(
            "chunkd enqueue (one-chunk jobs)",
            "enqueue_bench.py",
            me,
            *(["--jobs", "5000", "--single", "500"] if args.quick else []),
        )
    finally:
        cluster.cleanup()
    elapsed = time.monotonic() - started

    best_peer_noop = max(
        _median(pgq_best, "per_second"),
        _median(pgq_default, "per_second"),
        _median(proc_noop, "per_second"),
    )
    chunkd_held_ratios = _paired_ratios(chunkd_held, chunkd_noop)
    pgq_held_ratios = _paired_ratios(pgq_held, pgq_best)
    chunkd_held_ratio, pgq_held_ratio = _median_of(chunkd_held_ratios), _median_of(pgq_held_ratios)
    rows = [
        *_sql_cost_rows(sql_cost),
        ("no-op throughput, jobs/s (min / median)", ""),
        ("  chunkd", _min_med(chunkd_noop, "per_second")),
        ("  PGQueuer, best settings", _min_med(pgq_best, "per_second")),
        ("  PGQueuer, defaults", _min_med(pgq_default, "per_second")),
        ("  Procrastinate", _min_med(proc_noop, "per_second")),
        ("  raw SQL claim+complete, 100/stmt, 1 conn", _min_med(ceiling, "per_second")),
        ("  chunkd / best peer", f"{_median(chunkd_noop, 'per_second') / best_peer_noop:.2f}x"),
        (
            "  chunkd / raw ceiling",
            f"{_median(chunkd_noop, 'per_second') / _median(ceiling, 'per_second'):.0%}",
        ),
        ("  chunkd daemon CPU, µs per chunk", _min_med(chunkd_noop, "daemon_cpu_us_per_chunk")),
        ("tracing off: chunkd no-op jobs/s (min / median)", ""),
        ("  [otel] extra installed, no exporter configured", _min_med(chunkd_noop, "per_second")),
        ("  without opentelemetry", _min_med(chunkd_no_otel, "per_second")),
        (
            "  installed / without, per rep",
            " ".join(f"{x:.2f}" for x in _paired_ratios(chunkd_noop, chunkd_no_otel)),
        ),
        ("held snapshot: no-op jobs/s (min / median)", ""),
        ("  chunkd", _min_med(chunkd_held, "per_second")),
        ("  PGQueuer, best settings", _min_med(pgq_held, "per_second")),
        (
            "  held / clean: chunkd / PGQueuer",
            f"{chunkd_held_ratio:.2f} / {pgq_held_ratio:.2f}",
        ),
        (
            "  held / clean per rep: chunkd | PGQueuer",
            " ".join(f"{x:.2f}" for x in chunkd_held_ratios)
            + " | "
            + " ".join(f"{x:.2f}" for x in pgq_held_ratios),
        ),
        (
            "  chunkd's ratio / PGQueuer's (target >= 1)",
            f"{chunkd_held_ratio / pgq_held_ratio:.2f}x",
        ),
        ("10 ms handler, concurrency 50, jobs/s (ideal 5,000)", ""),
        ("  chunkd", _min_med(chunkd_sleep, "per_second")),
        ("  PGQueuer", _min_med(pgq_sleep, "per_second")),
        ("  Procrastinate", _min_med(proc_sleep, "per_second")),
        ("  chunkd / ideal", f"{_median(chunkd_sleep, 'per_second') / 5000:.0%}"),
        ("latency at 200/s, ms p50 / p99 (median of runs)", ""),
        ("  chunkd", f"{_median(chunkd_lat, 'p50_ms'):.2f} / {_median(chunkd_lat, 'p99_ms'):.2f}"),
        ("  PGQueuer", f"{_median(pgq_lat, 'p50_ms'):.2f} / {_median(pgq_lat, 'p99_ms'):.2f}"),
        *_remote_rows(remote),
        ("claim+complete with 1M finished chunks vs empty", ""),
        ("  cost ratio (<= 1.2 is flat)", _min_med(claim, "ratio", "{:.2f}")),
        ("chunkd processes, 10 ms handler, jobs/s", ""),
        (
            "  1 / 2 / 4 processes",
            " / ".join(
                f"{statistics.median(r['per_second'][k] for r in procs['runs']):,.0f}"
                for k in ("1", "2", "4")
            )
            if _values(procs, "scaling_2_over_1")
            else "error",
        ),
        ("  2 processes / 1", _min_med(procs, "scaling_2_over_1", "{:.2f}")),
        ("daemon RSS growth, 20k -> 200k chunks", _min_med(rss, "growth", "{:+.1%}")),
        *io_rows(io),
        ("enqueue, one-chunk jobs/s, 1 conn, each call committed (min / median)", ""),
        ("  create_sync_jobs, 1,000 jobs per call", _min_med(enqueue, "per_second")),
        ("  the same, every job with a dedupe key", _min_med(enqueue, "keyed_per_second")),
        ("  create_sync_job, one job per call", _min_med(enqueue, "single_per_second")),
        (
            "  create_sync_jobs / target of 5,000/s",
            f"{_median(enqueue, 'per_second') / 5000:.1f}x"
            if _values(enqueue, "per_second")
            else "error",
        ),
    ]
    settings = {e["label"]: e["runs"][0].get("settings") for e in b.results}
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "elapsed_s": round(elapsed, 1),
        "table": rows,
        "settings": settings,
        "results": b.results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    width = max(len(r[0]) for r in rows)
    print(f"\nchunkd benchmark, {os.cpu_count()} CPUs, fsync on, {elapsed:.0f} s\n")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\nsettings:")
    for label, s in settings.items():
        print(f"  {label}: {json.dumps(s, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small runs, one repeat")
    sys.exit(asyncio.run(main(parser.parse_args())))
