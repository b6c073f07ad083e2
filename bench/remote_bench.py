"""The daemon on another host: chunkd's no-op and latency scenarios with the daemon's
connections through bench/delay_proxy.py (1 ms each way: a 2 ms round trip), beside the
same daemon connected directly.

Variants, each run in a fresh database of one throwaway cluster (fsync on) that listens on
its unix socket and on 127.0.0.1:

- ``direct``: the daemon on the unix socket, as every other row of bench/run.py;
- ``tcp``: the daemon over loopback TCP, no proxy (shows what TCP alone costs);
- ``proxy0``: through the proxy at 0 ms (what the proxy itself costs);
- ``proxy1``: through the proxy at 1 ms each way.

Only the daemon's connections go through the proxy (``CHUNKD_BENCH_DAEMON_DSN``); the
producer of the latency scenario and the drained-yet check stay on the unix socket, so a
latency is a NOTIFY's one-way trip plus the daemon's own round trips. Variants are
interleaved, the order rotated each rep; medians over reps, and each variant's ratio to
``direct`` within each rep. The proxy's own CPU (utime+stime of its process) is reported
per chunk. Prints one JSON object on stdout (progress on stderr)::

    python bench/remote_bench.py            # about 5 minutes on 2 cores
    python bench/remote_bench.py --quick    # one rep, fewer jobs, 3 s of latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from chunkd.db import connect
from chunkd.demo.cluster import PostgresCluster

BENCH = Path(__file__).resolve().parent
VARIANTS = ("direct", "tcp", "proxy0", "proxy1")
LATENCY_VARIANTS = ("direct", "proxy0", "proxy1")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class RemoteBench:
    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self.counter = 0

    def _tcp_dsn(self, db: str, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=disable"

    async def run_one(self, variant: str, args: list[str]) -> dict[str, Any]:
        self.counter += 1
        db = f"remote_{self.counter}"
        admin = await connect(self.cluster.dsn("postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{db}"')
        finally:
            await admin.close()
        proxy = None
        env = dict(os.environ)
        try:
            if variant == "tcp":
                env["CHUNKD_BENCH_DAEMON_DSN"] = self._tcp_dsn(db, self.cluster.port)
            elif variant.startswith("proxy"):
                proxy = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(BENCH / "delay_proxy.py"),
                    "--upstream",
                    f"{self.cluster.socket_dir}/.s.PGSQL.{self.cluster.port}",
                    "--delay-ms",
                    variant.removeprefix("proxy"),
                    stdout=asyncio.subprocess.PIPE,
                )
                assert proxy.stdout is not None
                port = int(await asyncio.wait_for(proxy.stdout.readline(), 30))
                env["CHUNKD_BENCH_DAEMON_DSN"] = self._tcp_dsn(db, port)
            env["CHUNKD_BENCH_LOG_LEVEL"] = "warning"
            bench = await asyncio.create_subprocess_exec(
                sys.executable,
                str(BENCH / "chunkd_bench.py"),
                "--dsn",
                self.cluster.dsn(db),
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
            out, _ = await bench.communicate()
            proxy_cpu = _cpu_s(proxy.pid) if proxy is not None else None
        finally:
            if proxy is not None:
                proxy.terminate()
                await proxy.wait()
            admin = await connect(self.cluster.dsn("postgres"))
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                await admin.execute("CHECKPOINT")
            finally:
                await admin.close()
        lines = out.decode().strip().splitlines()
        result: dict[str, Any] = (
            json.loads(lines[-1]) if lines else {"error": f"no output (exit {bench.returncode})"}
        )
        result["variant"] = variant
        if proxy_cpu is not None and isinstance(result.get("jobs"), int):
            result["proxy_cpu_us_per_chunk"] = round(proxy_cpu / result["jobs"] * 1e6, 1)
        shown = result.get("error") or result.get("p50_ms") or result.get("per_second")
        print(f"  {args[1]:<8} {variant:<7} {shown}", file=sys.stderr, flush=True)
        return result

    async def interleaved(
        self, variants: tuple[str, ...], args: list[str], reps: int
    ) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(reps):
            order = list(variants[rep % len(variants) :] + variants[: rep % len(variants)])
            for variant in order:
                result = await self.run_one(variant, args)
                result["rep"] = rep + 1
                runs[variant].append(result)
        return runs


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 3) if values else None


def _ratios(runs: dict[str, list[dict[str, Any]]], variant: str, key: str) -> list[float]:
    """variant / direct within each rep."""
    direct = {r["rep"]: r.get(key) for r in runs["direct"]}
    return [
        round(r[key] / direct[r["rep"]], 3)
        for r in runs[variant]
        if isinstance(r.get(key), int | float) and direct.get(r["rep"])
    ]


def summarise(
    noop: dict[str, list[dict[str, Any]]], latency: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"noop": {}, "latency": {}}
    for variant, runs in noop.items():
        ratios = _ratios(noop, variant, "per_second")
        out["noop"][variant] = {
            "per_second_median": _median(runs, "per_second"),
            "per_second_min": min(
                (r["per_second"] for r in runs if isinstance(r.get("per_second"), float)),
                default=None,
            ),
            "daemon_cpu_us_per_chunk": _median(runs, "daemon_cpu_us_per_chunk"),
            "proxy_cpu_us_per_chunk": _median(runs, "proxy_cpu_us_per_chunk"),
            "ratio_to_direct": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_per_rep": ratios,
            "errors": [r["error"] for r in runs if "error" in r],
        }
    for variant, runs in latency.items():
        out["latency"][variant] = {
            "p50_ms": _median(runs, "p50_ms"),
            "p99_ms": _median(runs, "p99_ms"),
            "proxy_cpu_us_per_chunk": _median(runs, "proxy_cpu_us_per_chunk"),
            "p50_minus_direct_ms": [
                round(r["p50_ms"] - d["p50_ms"], 3)
                for r, d in zip(runs, latency["direct"], strict=True)
                if isinstance(r.get("p50_ms"), float) and isinstance(d.get("p50_ms"), float)
            ],
            "errors": [r["error"] for r in runs if "error" in r],
        }
    return out


async def main(args: argparse.Namespace) -> int:
    # 60,000 no-op chunks: about 2 s at ~30,000/s, long enough that start-up is not the run.
    jobs = "3000" if args.quick else "60000"
    duration = "3" if args.quick else "10"
    reps = 1 if args.quick else 4
    cluster = PostgresCluster(
        fsync=True, port=_free_port(), extra_settings={"listen_addresses": "127.0.0.1"}
    )
    started = time.monotonic()
    try:
        cluster.start()
        b = RemoteBench(cluster)
        print("no-op throughput: direct, TCP, proxy 0 ms, proxy 1 ms", file=sys.stderr)
        noop = await b.interleaved(VARIANTS, ["--scenario", "noop", "--jobs", jobs], reps)
        print("latency at 200/s: direct, proxy 0 ms, proxy 1 ms", file=sys.stderr)
        latency = await b.interleaved(
            LATENCY_VARIANTS, ["--scenario", "latency", "--duration", duration], max(1, reps - 1)
        )
    finally:
        cluster.cleanup()
    report = {
        "settings": {
            "delay_ms_each_way": 1.0,
            "round_trip_ms": 2.0,
            "proxy": "bench/delay_proxy.py, its own process (uvloop, timerfd delays)",
            "through_proxy": "the daemon's connections only (CHUNKD_BENCH_DAEMON_DSN)",
            "noop_jobs": int(jobs),
            "latency_rate_per_s": 200,
            "latency_duration_s": float(duration),
            "reps": reps,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        **summarise(noop, latency),
        "runs": {"noop": noop, "latency": latency},
    }
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one rep, fewer jobs")
    sys.exit(asyncio.run(main(parser.parse_args())))
