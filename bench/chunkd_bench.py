"""chunkd's side of the benchmark: same CLI and one-JSON-object output as bench/peers/.

Scenarios measured exactly like the peers' (pre-enqueued throughput, paced latency) run the
daemon in-process through ``chunkd.runtime.supervisor.run_daemon``, durable and with the audit trail
on. chunkd-only scenarios: ``claim_cost`` (1,000,000 finished chunks vs an empty queue),
``processes`` (N ``chunkd run`` subprocesses) and ``rss`` (daemon memory after 20k and 200k).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import _common as common

from chunkd import Chunk, __version__
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.handlers import HandlerRegistry
from chunkd.observability.logs import configure_logging
from chunkd.observability.tracing import configure as configure_tracing
from chunkd.runtime.supervisor import run_daemon
from chunkd.settings import RunSettings

CONTENDER = "chunkd"
KIND = "bench"
DEFAULT_JOBS = {
    "noop": 20_000,
    "sleep10": 10_000,
    "latency": 2_000,
    "claim_cost": 5_000,
    "processes": 10_000,
    "rss": 200_000,
}
BENCH_DIR = Path(__file__).resolve().parent
# Finished chunks in the tables for claim_cost (the spec's 1,000,000; smaller for --quick).
HISTORY_CHUNKS = int(os.environ.get("CHUNKD_BENCH_HISTORY", "1000000"))
# --no-otel: as if the [otel] extra were not installed (opentelemetry cannot be imported; chunkd
# imports it only when tracing is configured or a client looks for the current span), to set
# beside a run with it installed and no exporter configured (bench/run.py prints both).
NO_OTEL = "--no-otel" in sys.argv


class _NoOpenTelemetry:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def daemon_settings(scenario: str, dsn: str) -> RunSettings:
    """The settings chunkd runs with in each scenario (printed with the result).

    ``CHUNKD_BENCH_DAEMON_DSN``, when set, is the daemon's own DSN (the same database,
    e.g. through bench/delay_proxy.py as from another host); setup, producer and the
    drained-yet check keep ``dsn``.
    """
    concurrency = {"noop": 200, "sleep10": 50, "latency": 10}.get(scenario, 50)
    dsn = os.environ.get("CHUNKD_BENCH_DAEMON_DSN") or dsn
    return RunSettings(dsn=dsn, concurrency=concurrency, lease_s=60, poll_interval_s=30)


def _settings_dict(settings: RunSettings) -> dict[str, Any]:
    public = settings.public_dict()
    public.pop("dsn")
    return {
        **public,
        "durable": "fsync=on, synchronous_commit=on",
        "audit": "on",
        "opentelemetry": _otel_state(),
    }


def _otel_state() -> str:
    if NO_OTEL:
        return "not importable (--no-otel: as without the [otel] extra)"
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return "not installed"
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "")
    return (
        f"installed, OTEL_TRACES_EXPORTER={exporters!r}"
        if exporters
        else ("installed, no exporter configured (tracing off)")
    )


async def _enqueue(conn: Any, count: int, kind: str = KIND) -> None:
    # Jobs of at most 10,000 chunks, like real syncs split into several jobs.
    for start in range(0, count, 10_000):
        n = min(10_000, count - start)
        await conn.fetchval(
            "SELECT chunkd.create_sync_job($1, $2::jsonb)",
            kind,
            json.dumps([{"i": start + i} for i in range(n)]),
        )


async def _all_completed(conn: Any) -> bool:
    return not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM chunkd.chunk_processing_queue"
        " WHERE status IN ('pending', 'processing'))"
    )


async def _run_daemon_until(
    settings: RunSettings,
    handler: Callable[[Chunk], Awaitable[Any]],
    done: Callable[[], Awaitable[None]],
) -> None:
    stop = asyncio.Event()
    registry = HandlerRegistry(handlers={KIND: handler})
    # As `chunkd run` does: tracing only when the OTEL_* variables ask for it.
    tracing = configure_tracing(os.environ)
    daemon = asyncio.create_task(run_daemon(settings, registry, stop, tracing=tracing))
    try:
        waiter = asyncio.create_task(done())
        finished, _ = await asyncio.wait({daemon, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in finished:
            waiter.cancel()
            raise RuntimeError(f"daemon stopped early: {daemon.exception()!r}")
    finally:
        stop.set()
        await daemon


async def run_throughput(opts: common.Options) -> common.Result:
    settings = daemon_settings(opts.scenario, opts.dsn)
    conn = await connect(opts.dsn)
    try:
        await apply_migrations(conn)
        await _enqueue(conn, opts.jobs)
        await conn.execute("VACUUM ANALYZE")
        counter = common.Counter(opts.jobs)
        sleep_s = 0.010 if opts.scenario == "sleep10" else 0.0

        async def handler(chunk: Chunk) -> None:
            if sleep_s:
                await asyncio.sleep(sleep_s)
            counter.tick()

        ended: dict[str, float] = {}

        async def done() -> None:
            await counter.reached.wait()
            await common.wait_for_db(lambda: _all_completed(conn))
            # The span the peers time: worker start -> queue drained. The daemon's graceful
            # stop that follows is outside it, as the peers' stop_worker is.
            ended["wall"], ended["cpu"] = time.perf_counter(), time.process_time()

        started = time.perf_counter()
        cpu_started = time.process_time()
        await _run_daemon_until(settings, handler, done)
        seconds = ended["wall"] - started
        # This process's CPU (the daemon, asyncpg, the handler, the done-poller) per chunk:
        # the daemon's Python cost that issue #11 asks to halve.
        cpu_us = (ended["cpu"] - cpu_started) / opts.jobs * 1e6
        return common.throughput_result(
            opts,
            _settings_dict(settings),
            seconds,
            handler_calls=counter.count,
            daemon_cpu_us_per_chunk=round(cpu_us, 1),
            **common.runtime_info({"chunkd": __version__}),
        )
    finally:
        await conn.close()


async def run_latency(opts: common.Options) -> common.Result:
    settings = daemon_settings("latency", opts.dsn)
    conn = await connect(opts.dsn)
    producer = await connect(opts.dsn)
    try:
        await apply_migrations(conn)
        probe = common.LatencyProbe(opts.jobs)
        warm = asyncio.Event()

        async def handler(chunk: Chunk) -> None:
            index = chunk.payload
            if index == -1:
                warm.set()
            else:
                probe.mark_started(index)

        async def enqueue(index: int) -> None:
            await producer.fetchval(
                "SELECT chunkd.create_sync_job($1, $2::jsonb)", KIND, f"[{index}]"
            )

        result: dict[str, Any] = {}

        async def drive() -> None:
            await enqueue(-1)  # one chunk end to end: the daemon is up and LISTENing
            await warm.wait()
            result["enqueue_s"] = await common.produce_paced(probe, opts.rate, enqueue)
            await probe.counter.reached.wait()

        await _run_daemon_until(settings, handler, drive)
        return common.latency_result(
            opts,
            _settings_dict(settings),
            probe,
            result["enqueue_s"],
            **common.runtime_info({"chunkd": __version__}),
        )
    finally:
        await producer.close()
        await conn.close()


async def _claim_complete_seconds(conn: Any, chunks: int, batch: int = 100) -> float:
    """Time to claim and complete ``chunks`` pending chunks through the daemon's SQL calls,
    batch by batch."""
    started = time.perf_counter()
    while True:
        rows = await conn.fetch(
            "SELECT id, attempt FROM chunkd.claim_or_wait('w', $1, NULL, 600)", batch
        )
        if not rows:
            return time.perf_counter() - started
        await conn.fetch(
            "SELECT chunkd.complete_attempts('w', $1, $2, NULL)",
            [r["id"] for r in rows],
            [r["attempt"] for r in rows],
        )


async def _add_finished_history(conn: Any, chunks: int, per_job: int = 10_000) -> None:
    """Finished chunks with their audit rows, written set-wise (setup is not measured)."""
    await conn.execute(
        """
        WITH j AS (
            INSERT INTO chunkd.jobs (kind, total_chunks, completed_chunks, started_at,
                                     finished_at)
            SELECT 'history', $2::int, $2::int, now(), now()
            FROM generate_series(1, $1::int / $2::int)
            RETURNING id
        ), c AS (
            INSERT INTO chunkd.chunks (job_id, seq, payload)
            SELECT j.id, s, '{}' FROM j, generate_series(0, $2::int - 1) s
            RETURNING id, job_id
        )
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     lease_expires_at, ended_at, outcome, final)
        SELECT c.id, 1, 1, c.job_id, false, 'old', now(), now(), 'completed', true
        FROM c
        """,
        chunks,
        per_job,
    )


async def run_claim_cost(opts: common.Options) -> common.Result:
    conn = await connect(opts.dsn)
    try:
        await apply_migrations(conn)
        samples: dict[str, list[float]] = {"empty": [], "history": []}

        async def measure(label: str) -> None:
            for _ in range(3):
                await _enqueue(conn, opts.jobs)
                await conn.execute("VACUUM ANALYZE chunkd.chunk_processing_queue")
                samples[label].append(await _claim_complete_seconds(conn, opts.jobs))

        await measure("empty")
        await _add_finished_history(conn, HISTORY_CHUNKS)
        await conn.execute("VACUUM ANALYZE")
        await measure("history")
        empty, history = (statistics.median(samples[k]) for k in ("empty", "history"))
        finished = await conn.fetchval(
            "SELECT count(*) FROM chunkd.chunk_processing_queue WHERE status = 'completed'"
        )
        return {
            **common.base_fields(opts),
            "settings": {"batch": 100, "connections": 1, "chunks_per_sample": opts.jobs},
            "finished_chunks": finished,
            "empty_per_second": round(opts.jobs / empty, 1),
            "history_per_second": round(opts.jobs / history, 1),
            "ratio": round(history / empty, 3),
            "samples_s": samples,
        }
    finally:
        await conn.close()


def _start_daemons(dsn: str, count: int, handler: str, concurrency: int) -> list[Any]:
    env = dict(os.environ, CHUNKD_DSN=dsn, PYTHONPATH=str(BENCH_DIR))
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chunkd.cli",
                "--log-level",
                "warning",
                "run",
                "--handler",
                f"{KIND}={handler}",
                "--concurrency",
                str(concurrency),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


async def _wait_workers(conn: Any, count: int) -> None:
    async def ready() -> bool:
        return await conn.fetchval("SELECT count(*) FROM chunkd.workers") >= count

    await common.wait_for_db(ready, interval=0.05)


def _stop(processes: list[Any]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        p.wait(60)


async def run_processes(opts: common.Options) -> common.Result:
    """Throughput of 1, 2 and 4 ``chunkd run`` processes, 10 ms handler, concurrency 50 each."""
    conn = await connect(opts.dsn)
    try:
        await apply_migrations(conn)
        per_count: dict[str, float] = {}
        for count in (1, 2, 4):
            daemons = _start_daemons(opts.dsn, count, "bench_handlers:sleep10", 50)
            try:
                await _wait_workers(conn, count)
                await _enqueue(conn, opts.jobs)
                started = time.perf_counter()  # from the commit that NOTIFYs the daemons
                await common.wait_for_db(lambda: _all_completed(conn), interval=0.01)
                per_count[str(count)] = round(opts.jobs / (time.perf_counter() - started), 1)
            finally:
                _stop(daemons)
            await conn.execute("TRUNCATE chunkd.workers")
        return {
            **common.base_fields(opts),
            "settings": {"handler": "asyncio.sleep(0.010)", "concurrency": 50, "jobs": opts.jobs},
            "per_second": per_count,
            "scaling_2_over_1": round(per_count["2"] / per_count["1"], 3),
            "scaling_4_over_1": round(per_count["4"] / per_count["1"], 3),
        }
    finally:
        await conn.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def run_rss(opts: common.Options) -> common.Result:
    """One daemon process: RSS after 20,000 chunks and after ``--jobs`` (200,000) in total."""
    conn = await connect(opts.dsn)
    try:
        await apply_migrations(conn)
        (daemon,) = _start_daemons(opts.dsn, 1, "bench_handlers:noop", 100)
        try:
            await _wait_workers(conn, 1)
            await _enqueue(conn, 20_000)
            await common.wait_for_db(lambda: _all_completed(conn), interval=0.05)
            rss_20k = _rss_kib(daemon.pid)
            await _enqueue(conn, opts.jobs - 20_000)
            await common.wait_for_db(lambda: _all_completed(conn), interval=0.05)
            rss_total = _rss_kib(daemon.pid)
        finally:
            _stop([daemon])
        return {
            **common.base_fields(opts),
            "settings": {"handler": "no-op", "concurrency": 100},
            "rss_kib_after_20k": rss_20k,
            f"rss_kib_after_{opts.jobs // 1000}k": rss_total,
            "growth": round(rss_total / rss_20k - 1, 4),
        }
    finally:
        await conn.close()


async def run(opts: common.Options) -> common.Result:
    runners = {
        "latency": run_latency,
        "claim_cost": run_claim_cost,
        "processes": run_processes,
        "rss": run_rss,
    }
    return await runners.get(opts.scenario, run_throughput)(opts)


if __name__ == "__main__":
    # As under systemd: JSON lines, per-chunk events at info level; to stderr, because stdout
    # carries the one result object.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    configure_logging("json", os.environ.get("CHUNKD_BENCH_LOG_LEVEL", "info"))
    sys.stdout = real_stdout
    if NO_OTEL:
        sys.argv.remove("--no-otel")
        sys.meta_path.insert(0, _NoOpenTelemetry())  # type: ignore[arg-type]
    sys.exit(common.main(CONTENDER, DEFAULT_JOBS, run))
