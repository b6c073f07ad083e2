"""One ``chunkd run`` process: starts the tasks, restarts any that dies, and stops gracefully.

Tasks: the LISTEN connection, the claim loop, the outcome writers, heartbeats, the reaper,
the maintenance (retention), the safety poll, the stall detector, the readiness checks
(``/readyz``), and the systemd notifier; each task's state and the stall detector's ticks
feed ``/healthz``. Chunks run in a pool of ``--concurrency`` long-lived worker tasks
(:mod:`chunkd.runtime.pool`). Stopping (:mod:`chunkd.runtime.stop`): no new claims, in-flight
chunks get ``--shutdown-timeout`` to finish, outcomes already produced are written, the rest
is released without spending an attempt, and the worker row is removed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from chunkd.db import (
    DATABASE_ERRORS,
    TRANSIENT_ERRORS,
    Listener,
    Queue,
    WorkerRegistration,
    connect,
    create_pool,
)
from chunkd.db.migrate import check_schema
from chunkd.errors import ServerNotReadyError
from chunkd.handlers import HandlerRegistry
from chunkd.observability.metrics import Metrics
from chunkd.observability.probes import Probes
from chunkd.observability.sdnotify import Notifier
from chunkd.observability.tracing import Tracing
from chunkd.runtime import loop_errors
from chunkd.runtime.claimer import Claimer
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.heartbeat import Heartbeat
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.maintenance import Maintenance
from chunkd.runtime.outcomes import Outcomes
from chunkd.runtime.pool import WorkerPool
from chunkd.runtime.progress import Progress
from chunkd.runtime.readiness import STALE_AFTER_S, ReadinessChecks
from chunkd.runtime.reaper import Reaper
from chunkd.runtime.schedules import Scheduler, file_clock
from chunkd.runtime.stall import StallDetector
from chunkd.runtime.stop import Stopping, stop_gracefully
from chunkd.runtime.worker import Worker
from chunkd.settings import RunSettings
from chunkd.version import __version__

__all__ = ["make_worker_id", "run_daemon"]

log = structlog.get_logger("chunkd.runtime.supervisor")
T = TypeVar("T")

RESTART_DELAY_S = 1.0
# How long the stop waits for the cancelled tasks to end (the last second of the stop's bound).
SERVICES_STOP_S = 1.0
# How long start-up waits for a server that says it is starting up or shutting down.
STARTUP_WAIT_S = 60.0
# Closing the pool after a stop: a graceful close costs a round trip; past this, just drop it.
POOL_CLOSE_S = 1.0


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def _supervise(name: str, run: Callable[[], Awaitable[None]], probes: Probes) -> None:
    """Keeps one long-running task alive: a crash is logged with its reason and restarted.
    Its state goes to ``probes`` (``/healthz``)."""
    while True:
        probes.task_state(name, "running")
        try:
            await run()
            probes.task_state(name, "ended")
            return  # a deliberate end (the claimer returns once stopped)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task.crashed", task=name, restart_in_s=RESTART_DELAY_S)
            probes.task_state(name, "restarting")
        await asyncio.sleep(RESTART_DELAY_S)


async def _when_ready(what: str, step: Callable[[], Awaitable[T]], deadline: float) -> T:
    """Runs one start-up step until it succeeds. A server that is starting or shutting down (a
    restart under way), or a connection cut in the middle of the step (a terminated backend, a
    restart), is waited for until ``deadline`` (``time.monotonic()``); anything else (refused, a
    bad password, no database, a schema too old) fails at once."""
    while True:
        try:
            return await step()
        except (ServerNotReadyError, *TRANSIENT_ERRORS) as exc:
            if time.monotonic() > deadline:
                raise
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("database.not_ready", step=what, error=error, retry_in_s=0.5)
            await asyncio.sleep(0.5)


async def _check_schema(dsn: str) -> None:
    conn = await connect(dsn)
    try:
        await check_schema(conn)
    finally:
        await conn.close()  # on a connection cut meanwhile: a no-op, or a transient error


async def run_daemon(
    settings: RunSettings,
    registry: HandlerRegistry,
    stop: asyncio.Event,
    *,
    notifier: Notifier | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Runs until ``stop`` is set, then shuts down gracefully and returns.

    With ``settings.metrics_port``, ``/metrics``, ``/healthz`` and ``/readyz`` are served from
    the start (``/readyz`` says "starting" while the database is waited for). ``tracing``: the
    spans of chunks and jobs (None: off); the caller shuts it down.
    """
    loop_errors.install()
    notifier = notifier or Notifier()
    metrics = metrics or Metrics()
    worker_id = make_worker_id()
    if tracing is not None:
        tracing.worker_id = worker_id
    probes = Probes(
        stall_threshold_s=settings.stall_threshold_s,
        stale_after_s=STALE_AFTER_S,
        worker_id=worker_id,
        version=__version__,
    )
    stall = StallDetector(
        worker_id=worker_id, threshold_s=settings.stall_threshold_s, on_tick=probes.tick
    )
    stall_task = asyncio.create_task(_supervise("stall", stall.run, probes), name="stall")
    try:
        if settings.metrics_port is not None:
            metrics.serve(settings.metrics_port, probes=probes)
        deadline = time.monotonic() + STARTUP_WAIT_S
        await _when_ready("schema check", lambda: _check_schema(settings.dsn), deadline)
        pool = await _when_ready(
            "pool",
            lambda: create_pool(settings.dsn, size=min(settings.concurrency, 8) + 4),
            deadline,
        )
        try:
            outside = _Outside(notifier, metrics, probes, tracing)
            await _serve(settings, registry, stop, Queue(pool), outside, worker_id, deadline)
        finally:
            try:
                await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_S)
            except TimeoutError:
                pool.terminate()
    finally:
        stall_task.cancel()
        await asyncio.gather(stall_task, return_exceptions=True)
        await registry.aclose()
        notifier.close()


@dataclass(frozen=True)
class _Outside:
    """What the daemon tells the outside world: systemd, the metrics, the probes, traces."""

    notifier: Notifier
    metrics: Metrics
    probes: Probes
    tracing: Tracing | None


async def _serve(
    settings: RunSettings,
    registry: HandlerRegistry,
    stop: asyncio.Event,
    queue: Queue,
    outside: _Outside,
    worker_id: str,
    startup_deadline: float,
) -> None:
    notifier, metrics, probes = outside.notifier, outside.metrics, outside.probes
    kinds = registry.kinds
    log.info(
        "daemon.starting",
        worker_id=worker_id,
        version=__version__,
        kinds=kinds,
        settings=settings.public_dict(),
    )
    me = WorkerRegistration(
        worker_id,
        socket.gethostname(),
        os.getpid(),
        __version__,
        tuple(kinds),
        settings.concurrency,
    )
    await _when_ready(
        "register worker",
        lambda: queue.register_worker(
            me.worker_id, me.host, me.pid, me.version, me.kinds, me.concurrency
        ),
        startup_deadline,
    )

    inflight = InFlight(
        settings.concurrency, worker_id=worker_id, chunk_timeout_s=settings.chunk_timeout_s
    )
    health = DatabaseHealth(queue, worker_id=worker_id)
    # Read at scrape time: exact even when handlers are cancelled at shutdown.
    metrics.in_flight.set_function(lambda: inflight.running)
    progress = Progress(inflight, worker_id=worker_id, interval_s=settings.progress_interval_s)
    outcomes = Outcomes(
        queue,
        inflight,
        metrics,
        health,
        progress,
        worker_id=worker_id,
        retry_base_s=settings.retry_base_s,
        retry_cap_s=settings.retry_cap_s,
        max_snoozes=settings.max_snoozes,
        lease_s=settings.lease_s,
    )
    claimer: Claimer
    worker = Worker(
        registry.handlers,
        outcomes,
        inflight,
        metrics,
        chunk_timeout_s=settings.chunk_timeout_s,
        on_slot_freed=lambda kind, handler_s: claimer.slot_freed(kind, handler_s),
        tracing=outside.tracing,
    )
    claimer = Claimer(
        queue,
        inflight,
        metrics,
        health,
        worker_id=worker_id,
        kinds=kinds,
        lease_s=settings.lease_s,
        wake_workers=lambda chunks: pool.wake(chunks),
    )
    pool = WorkerPool(worker, inflight, claimer.take, claimer.work_signalled)
    heartbeat = Heartbeat(queue, inflight, health, worker=me, lease_s=settings.lease_s)
    reaper = Reaper(
        queue,
        metrics,
        health,
        interval_s=settings.reap_interval_s,
        worker_id=worker_id,
        inflight=inflight,
    )
    ready = asyncio.Event()

    async def on_connected() -> None:
        try:
            await claimer.arm_from_database()
        except DATABASE_ERRORS as exc:
            log.warning("arm.failed", error=str(exc).splitlines()[0] if str(exc) else repr(exc))
            claimer.work_signalled()
        if not ready.is_set():
            ready.set()
            notifier.ready(f"listening; 0/{settings.concurrency} in flight")
            if not stop.is_set():
                probes.set_phase("running")
            log.info("daemon.ready", worker_id=worker_id)

    listener = Listener(settings.dsn, claimer.on_notify, on_connected)

    async def poll() -> None:
        while True:
            await asyncio.sleep(settings.poll_interval_s)
            claimer.work_signalled()

    async def tell_systemd() -> None:
        interval_s = min(notifier.watchdog_interval_s or 5.0, 5.0)
        while True:
            await asyncio.sleep(interval_s)
            # From the event loop itself: a blocked loop stops the pings, and systemd restarts us.
            notifier.watchdog()
            if not stop.is_set():  # while stopping, keep the "stopping" status visible
                notifier.status(f"{inflight.running}/{settings.concurrency} in flight")

    services = {
        "listener": listener.run,
        "claimer": claimer.run,
        "outcomes": outcomes.run,
        "heartbeat": heartbeat.run,
        "reaper": reaper.run,
        "poll": poll,
        "readiness": ReadinessChecks(queue, listener, probes).run,
    }
    if notifier.enabled:
        services["systemd"] = tell_systemd
    if outside.tracing is not None:
        from chunkd.runtime.finished import JOB_FINISHED_CHANNEL, FinishedJobs

        finished = FinishedJobs(queue, outside.tracing, worker_id=worker_id)
        heard = Listener(settings.dsn, finished.on_notify, finished.connected,
                         channel=JOB_FINISHED_CHANNEL)  # fmt: skip
        services.update(job_finished=finished.run, job_finished_listener=heard.run)
    if settings.progress_interval_s > 0:
        services["progress"] = progress.run
    if settings.schedule_interval_s > 0:
        services["schedules"] = _scheduler(settings, queue, worker_id, health).run
    if settings.maintenance_interval_s > 0:
        services["maintenance"] = Maintenance(
            queue, health, interval_s=settings.maintenance_interval_s, worker_id=worker_id
        ).run
    if settings.metrics_port is not None:
        from chunkd.runtime.depth import QueueDepthSampler

        sampler = QueueDepthSampler(queue, metrics, interval_s=settings.metrics_interval_s)
        services["queue_depth"] = sampler.run
    pool.start()
    service_tasks = {
        name: asyncio.create_task(_supervise(name, run, probes), name=name)
        for name, run in services.items()
    }
    try:
        await stop.wait()
    finally:
        probes.set_phase("stopping")
        await stop_gracefully(
            Stopping(
                worker_id=worker_id,
                shutdown_timeout_s=settings.shutdown_timeout_s,
                queue=queue,
                claimer=claimer,
                claimer_task=service_tasks["claimer"],
                heartbeat=heartbeat,
                inflight=inflight,
                outcomes=outcomes,
                pool=pool,
                notifier=notifier,
                metrics=metrics,
            )
        )
        inflight.close()
        for task in service_tasks.values():
            task.cancel()
        # Bounded: a task cancelled in the middle of a statement to a server that no longer
        # answers can take asyncpg's cancel request as long as the connect timeout to end.
        _done, stuck = await asyncio.wait(service_tasks.values(), timeout=SERVICES_STOP_S)
        if stuck:
            log.warning("tasks.still_stopping", tasks=sorted(t.get_name() for t in stuck))
        progress.flush()  # the outcomes since the last progress lines, written by the stop
        log.info("daemon.stopped", worker_id=worker_id)


def _scheduler(
    settings: RunSettings, queue: Queue, worker_id: str, health: DatabaseHealth
) -> Scheduler:
    clock = file_clock(settings.schedule_clock_file) if settings.schedule_clock_file else None
    return Scheduler(
        queue.schedules,
        worker_id=worker_id,
        interval_s=settings.schedule_interval_s,
        clock=clock,
        health=health,
    )
