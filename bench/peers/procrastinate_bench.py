"""Procrastinate side of the chunkd side-by-side benchmark.

Run with the peer venv's python (see README.md); prints one JSON object on stdout.
Uses only Procrastinate's public API: App + PsycopgConnector, schema_manager.
apply_schema_async for the schema, Task.batch_defer_async / defer_async to enqueue,
and App.run_worker_async for the worker (stopped by cancelling it, as documented).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import procrastinate
import psycopg
from procrastinate import App, PsycopgConnector

try:
    from . import _common as common
except ImportError:  # run as a script: python bench/peers/procrastinate_bench.py
    import _common as common  # type: ignore[no-redef]

CONTENDER = "procrastinate"
DEFAULT_JOBS = {"noop": 20_000, "sleep10": 10_000, "latency": 0}
TASK_NAME = "bench"
ENQUEUE_CHUNK = 5_000
SLEEP10_CONCURRENCY = 50
SLEEP10_HANDLER_S = 0.010
# Procrastinate's documented throughput knob is worker concurrency (howto/concurrency).
# On the 2-core test machine no-op throughput was flat (within run-to-run noise) for
# any concurrency from 3 to 100 and ~25% lower at 1; 10 sits in the middle of that plateau.
BEST_CONCURRENCY = 10
# psycopg_pool's default pool is 4 connections, which caps a concurrent worker (each job
# holds a pooled connection to fetch and again to finish); best sizes it to concurrency.
DEFAULT_POOL_SIZE = 4
WARMUP_INDEX = -1
FAILED_STATUSES = ("failed", "cancelled", "aborted")
STATUS_COUNTS_SQL = (
    "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok,"
    " count(*) FILTER (WHERE status IN ('failed', 'cancelled', 'aborted')) AS bad"
    " FROM procrastinate_jobs"
)

Handler = Callable[..., Awaitable[None]]


def worker_settings(scenario: str, settings: str) -> dict[str, Any]:
    """The exact Procrastinate knobs; `default` is run_worker_async() with no arguments."""
    chosen: dict[str, Any] = {
        "profile": settings,
        "connector": "PsycopgConnector (psycopg_pool.AsyncConnectionPool)",
        "concurrency": 1,
        "pool_min_size": DEFAULT_POOL_SIZE,
        "pool_max_size": DEFAULT_POOL_SIZE,
        "listen_notify": True,
        "fetch_job_polling_interval_s": 5.0,
        "abort_job_polling_interval_s": 5.0,
        "delete_jobs": "never",
        "analyze_after_enqueue": scenario != "latency",
    }
    if scenario == "sleep10":
        chosen["concurrency"] = SLEEP10_CONCURRENCY
    elif settings == "best":
        chosen["concurrency"] = BEST_CONCURRENCY
    if settings == "best":
        # One pooled connection per concurrent job, plus one for the producer/heartbeat.
        chosen["pool_max_size"] = max(DEFAULT_POOL_SIZE, chosen["concurrency"] + 1)
    return chosen


def worker_kwargs(chosen: dict[str, Any]) -> dict[str, Any]:
    """Translate the reported settings into App.run_worker_async() arguments."""
    return {
        "concurrency": chosen["concurrency"],
        "listen_notify": chosen["listen_notify"],
        "fetch_job_polling_interval": chosen["fetch_job_polling_interval_s"],
        "abort_job_polling_interval": chosen["abort_job_polling_interval_s"],
        "delete_jobs": chosen["delete_jobs"],
        "install_signal_handlers": False,
    }


class _InProcessWorkerFilter(logging.Filter):
    """Drop the "App is instantiated in the main Python module" warning.

    It guards workers in other processes that import tasks by dotted path; here the
    worker runs in this very process and the task has an explicit name.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "instantiated in the main Python module" not in record.getMessage()


def make_app(dsn: str, chosen: dict[str, Any]) -> App:
    logging.getLogger("procrastinate.blueprints").addFilter(_InProcessWorkerFilter())
    return App(
        connector=PsycopgConnector(
            conninfo=dsn,
            min_size=chosen["pool_min_size"],
            max_size=chosen["pool_max_size"],
        )
    )


async def enqueue_bulk(task: procrastinate.tasks.Task[Any, Any, Any], count: int) -> None:
    """Pre-enqueue with the documented batch_defer; not part of the measurement."""
    for start in range(0, count, ENQUEUE_CHUNK):
        await task.batch_defer_async(
            *[{"i": i} for i in range(start, min(count, start + ENQUEUE_CHUNK))]
        )


async def all_succeeded(conn: psycopg.AsyncConnection[Any], count: int) -> bool:
    """Done means Procrastinate's own jobs table says `succeeded` for every job."""
    cur = await conn.execute(STATUS_COUNTS_SQL)
    row = await cur.fetchone()
    assert row is not None
    ok, bad = row
    if bad:
        raise RuntimeError(f"{bad} jobs ended in one of {FAILED_STATUSES}")
    return bool(ok >= count)


async def server_info(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    cur = await conn.execute(common.SERVER_INFO_SQL)
    row = await cur.fetchone()
    assert row is not None and cur.description is not None
    return {col.name: value for col, value in zip(cur.description, row, strict=True)}


async def stop_worker(task: asyncio.Task[None]) -> None:
    """Cancel = Procrastinate's documented graceful stop for an in-app worker."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=common.STOP_TIMEOUT_S)
    if not done:
        raise RuntimeError("Procrastinate worker did not stop in time")
    if not task.cancelled() and task.exception() is not None:
        raise RuntimeError(f"Procrastinate worker failed: {task.exception()!r}")


def throughput_handler(scenario: str, counter: common.Counter) -> Handler:
    """noop: count and return; sleep10: 10 ms of async wait first."""
    if scenario == "sleep10":

        async def sleeping(i: int) -> None:
            await asyncio.sleep(SLEEP10_HANDLER_S)
            counter.tick()

        return sleeping

    async def noop(i: int) -> None:
        counter.tick()

    return noop


def versions() -> dict[str, str]:
    return {
        "procrastinate": procrastinate.__version__,
        "psycopg": psycopg.__version__,
        "psycopg_pool": version("psycopg-pool"),
    }


async def run_throughput(opts: common.Options) -> common.Result:
    """Pre-enqueue N jobs, then time worker start -> all N `succeeded` in the jobs table."""
    chosen = worker_settings(opts.scenario, opts.settings)
    counter = common.Counter(opts.jobs)
    app = make_app(opts.dsn, chosen)
    task = app.task(name=TASK_NAME)(throughput_handler(opts.scenario, counter))
    admin = await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True)
    try:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            await enqueue_bulk(task, opts.jobs)
            await admin.execute("ANALYZE")
            started = time.perf_counter()
            worker = asyncio.create_task(app.run_worker_async(**worker_kwargs(chosen)))
            try:
                await common.until_set_or_worker_exit(counter.reached, worker)
                await common.wait_for_db(lambda: all_succeeded(admin, opts.jobs))
                seconds = time.perf_counter() - started
            finally:
                await stop_worker(worker)
        return common.throughput_result(
            opts,
            chosen,
            seconds,
            handler_calls=counter.count,
            server=await server_info(admin),
            **common.runtime_info(versions()),
        )
    finally:
        await admin.close()


def latency_handler(probe: common.LatencyProbe, warm: asyncio.Event) -> Handler:
    async def record(i: int) -> None:
        if i == WARMUP_INDEX:
            warm.set()
        else:
            probe.mark_started(i)

    return record


async def run_latency(opts: common.Options) -> common.Result:
    """Idle worker; the same app enqueues single jobs with defer_async at --rate."""
    chosen = worker_settings(opts.scenario, opts.settings)
    probe = common.LatencyProbe(opts.jobs)
    warm = asyncio.Event()
    app = make_app(opts.dsn, chosen)
    task = app.task(name=TASK_NAME)(latency_handler(probe, warm))
    admin = await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True)
    try:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            worker = asyncio.create_task(app.run_worker_async(**worker_kwargs(chosen)))
            try:
                # One job end to end first: the worker is then up and LISTENing, i.e. idle.
                await task.defer_async(i=WARMUP_INDEX)
                await common.until_set_or_worker_exit(warm, worker)
                enqueue_seconds = await common.produce_paced(
                    probe, opts.rate, lambda i: task.defer_async(i=i)
                )
                await common.until_set_or_worker_exit(probe.counter.reached, worker)
            finally:
                await stop_worker(worker)
        return common.latency_result(
            opts,
            chosen,
            probe,
            enqueue_seconds,
            server=await server_info(admin),
            **common.runtime_info(versions()),
        )
    finally:
        await admin.close()


async def run(opts: common.Options) -> common.Result:
    """Entry point for one scenario; importable for callers that want the dict."""
    if opts.scenario == "latency":
        return await run_latency(opts)
    return await run_throughput(opts)


if __name__ == "__main__":
    sys.exit(common.main(CONTENDER, DEFAULT_JOBS, run))
