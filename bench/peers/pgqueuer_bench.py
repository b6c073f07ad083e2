"""PGQueuer side of the chunkd side-by-side benchmark.

Run with the peer venv's python (see README.md); prints one JSON object on stdout.
Uses only PGQueuer's public API: Queries.install / optimize_autovacuum / enqueue for
setup, and a PgQueuer worker (the object `pgq run` runs) over one asyncpg connection.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pgqueuer
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries

try:
    from . import _common as common
except ImportError:  # run as a script: python bench/peers/pgqueuer_bench.py
    import _common as common  # type: ignore[no-redef]

CONTENDER = "pgqueuer"
DEFAULT_JOBS = {"noop": 20_000, "sleep10": 10_000, "latency": 0}
ENTRYPOINT = "bench"
ENQUEUE_CHUNK = 5_000
SLEEP10_CONCURRENCY = 50
SLEEP10_HANDLER_S = 0.010
# Documented tuning: raise batch_size for short jobs (docs/guides/performance-tuning.md).
# 100 was the fastest of 10/25/50/100/200/500 on the 2-core test machine (see README).
BEST_BATCH_SIZE = 100
WARMUP_PAYLOAD = b"warmup"

Handler = Callable[[Job], Awaitable[None]]


def worker_settings(scenario: str, settings: str) -> dict[str, Any]:
    """The exact PGQueuer knobs for a run; `default` is what PgQueuer.run() does untouched."""
    chosen: dict[str, Any] = {
        "profile": settings,
        "driver": "AsyncpgDriver (one dedicated asyncpg connection for the worker)",
        "batch_size": 10,
        "max_concurrent_tasks": None,
        "entrypoint_concurrency_limit": 0,
        "dequeue_timeout_s": 30.0,
        "heartbeat_timeout_s": 30.0,
        "log_aggregation_interval_s": 30.0,
        "durability": "durable",
        "autovac": False,
        "analyze_after_enqueue": scenario != "latency",
    }
    if settings == "best":
        chosen.update(batch_size=BEST_BATCH_SIZE, autovac=True)
    if scenario == "sleep10":
        # PgQueuer refuses max_concurrent_tasks < 2 x batch_size.
        chosen["max_concurrent_tasks"] = SLEEP10_CONCURRENCY
        chosen["batch_size"] = min(chosen["batch_size"], SLEEP10_CONCURRENCY // 2)
    return chosen


def run_kwargs(chosen: dict[str, Any]) -> dict[str, Any]:
    """Translate the reported settings into PgQueuer.run() arguments."""
    return {
        "batch_size": chosen["batch_size"],
        "max_concurrent_tasks": chosen["max_concurrent_tasks"],
        "dequeue_timeout": timedelta(seconds=chosen["dequeue_timeout_s"]),
        "heartbeat_timeout": timedelta(seconds=chosen["heartbeat_timeout_s"]),
        "log_aggregation_interval": timedelta(seconds=chosen["log_aggregation_interval_s"]),
    }


async def install(queries: Queries, chosen: dict[str, Any]) -> None:
    """`pgq install` (+ `pgq autovac` for best) through the same Queries API the CLI uses."""
    await queries.install()
    if chosen["autovac"]:
        await queries.optimize_autovacuum()


async def enqueue_bulk(queries: Queries, count: int) -> None:
    """Pre-enqueue in a few multi-row inserts; not part of the measurement."""
    for start in range(0, count, ENQUEUE_CHUNK):
        size = min(ENQUEUE_CHUNK, count - start)
        await queries.enqueue(
            [ENTRYPOINT] * size,
            [str(i).encode() for i in range(start, start + size)],
            [0] * size,
        )


async def queue_is_empty(conn: asyncpg.Connection, queries: Queries) -> bool:
    """PgQueuer deletes a job from its queue table in the same statement that logs it."""
    table = queries.qbe.qualified.queue_table  # PgQueuer's own validated identifier
    return bool(await conn.fetchval(f"SELECT NOT EXISTS (SELECT 1 FROM {table})"))  # noqa: S608


async def server_info(conn: asyncpg.Connection) -> dict[str, str]:
    return dict(await conn.fetchrow(common.SERVER_INFO_SQL))


def make_worker(conn: asyncpg.Connection, handler: Handler, chosen: dict[str, Any]) -> PgQueuer:
    pgq = PgQueuer(AsyncpgDriver(conn))
    pgq.entrypoint(ENTRYPOINT, concurrency_limit=chosen["entrypoint_concurrency_limit"])(handler)
    return pgq


async def stop_worker(pgq: PgQueuer, task: asyncio.Task[None]) -> None:
    """Ask for a graceful stop (what SIGTERM does under `pgq run`), then wait for it."""
    pgq.shutdown.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), common.STOP_TIMEOUT_S)
    except TimeoutError:
        task.cancel()
        raise RuntimeError("PgQueuer worker did not stop in time") from None


def throughput_handler(scenario: str, counter: common.Counter) -> Handler:
    """noop: count and return; sleep10: 10 ms of async wait first."""
    if scenario == "sleep10":

        async def sleeping(job: Job) -> None:
            await asyncio.sleep(SLEEP10_HANDLER_S)
            counter.tick()

        return sleeping

    async def noop(job: Job) -> None:
        counter.tick()

    return noop


def versions() -> dict[str, str]:
    return {"pgqueuer": pgqueuer.__version__, "asyncpg": asyncpg.__version__}


async def run_throughput(opts: common.Options) -> common.Result:
    """Pre-enqueue N jobs, then time worker start -> queue table empty."""
    chosen = worker_settings(opts.scenario, opts.settings)
    admin = await asyncpg.connect(opts.dsn)
    worker_conn = await asyncpg.connect(opts.dsn)
    try:
        queries = Queries(AsyncpgDriver(admin))
        await install(queries, chosen)
        await enqueue_bulk(queries, opts.jobs)
        await admin.execute("ANALYZE")
        counter = common.Counter(opts.jobs)
        pgq = make_worker(worker_conn, throughput_handler(opts.scenario, counter), chosen)
        started = time.perf_counter()
        task = asyncio.create_task(pgq.run(**run_kwargs(chosen)))
        try:
            await common.until_set_or_worker_exit(counter.reached, task)
            await common.wait_for_db(lambda: queue_is_empty(admin, queries))
            seconds = time.perf_counter() - started
        finally:
            await stop_worker(pgq, task)
        return common.throughput_result(
            opts,
            chosen,
            seconds,
            handler_calls=counter.count,
            server=await server_info(admin),
            **common.runtime_info(versions()),
        )
    finally:
        await worker_conn.close()
        await admin.close()


def latency_handler(probe: common.LatencyProbe, warm: asyncio.Event) -> Handler:
    async def record(job: Job) -> None:
        if job.payload == WARMUP_PAYLOAD:
            warm.set()
        elif job.payload is not None:
            probe.mark_started(int(job.payload))

    return record


async def run_latency(opts: common.Options) -> common.Result:
    """Idle worker; one producer connection enqueues single jobs at --rate."""
    chosen = worker_settings(opts.scenario, opts.settings)
    admin = await asyncpg.connect(opts.dsn)
    worker_conn = await asyncpg.connect(opts.dsn)
    producer_conn = await asyncpg.connect(opts.dsn)
    try:
        await install(Queries(AsyncpgDriver(admin)), chosen)
        producer = Queries(AsyncpgDriver(producer_conn))
        probe = common.LatencyProbe(opts.jobs)
        warm = asyncio.Event()
        pgq = make_worker(worker_conn, latency_handler(probe, warm), chosen)
        task = asyncio.create_task(pgq.run(**run_kwargs(chosen)))
        try:
            # One job end to end first: the worker is then up and LISTENing, i.e. idle.
            await producer.enqueue(ENTRYPOINT, WARMUP_PAYLOAD)
            await common.until_set_or_worker_exit(warm, task)
            enqueue_seconds = await common.produce_paced(
                probe, opts.rate, lambda i: producer.enqueue(ENTRYPOINT, str(i).encode())
            )
            await common.until_set_or_worker_exit(probe.counter.reached, task)
        finally:
            await stop_worker(pgq, task)
        return common.latency_result(
            opts,
            chosen,
            probe,
            enqueue_seconds,
            server=await server_info(admin),
            **common.runtime_info(versions()),
        )
    finally:
        await producer_conn.close()
        await worker_conn.close()
        await admin.close()


async def run(opts: common.Options) -> common.Result:
    """Entry point for one scenario; importable for callers that want the dict."""
    if opts.scenario == "latency":
        return await run_latency(opts)
    return await run_throughput(opts)


if __name__ == "__main__":
    sys.exit(common.main(CONTENDER, DEFAULT_JOBS, run))
