"""The graceful stop of ``chunkd run`` (SIGTERM/SIGINT), in bounded steps.

1. No new claims; a claim already sent is waited for (its rows are kept, not started), so the
   release below sees it committed. Meanwhile running handlers get ``--shutdown-timeout`` to
   finish; the rest are cancelled.
2. Outcomes already produced are written.
3. Heartbeats stop (one in flight is waited for); then one statement hands back every chunk
   the worker still holds on the server, whether or not this process knows of it (a claim
   whose reply never came), and removes its row.

Every step is bounded, so a stop takes at most ``--shutdown-timeout`` plus 15 s however slow
the database answers: 2 s for cancelled handlers to unwind (or 3 s for the claim), 10 s for
the writes, 1 s for the daemon's other tasks to end (the supervisor) and 1 s for the caller to
close the connections. Whatever could not be written or
released is left to its lease: the reaper returns it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.observability.metrics import Metrics
from chunkd.observability.sdnotify import Notifier
from chunkd.runtime.claimer import Claimer
from chunkd.runtime.health import first_line
from chunkd.runtime.heartbeat import Heartbeat
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.outcomes import Outcomes
from chunkd.runtime.pool import WorkerPool

__all__ = ["CLAIM_WAIT_S", "FINAL_WRITES_S", "Stopping", "stop_gracefully"]

log = structlog.get_logger("chunkd.runtime.stop")

# A claim in flight normally answers in milliseconds; this bounds a very slow network.
CLAIM_WAIT_S = 3.0
# Cancelled handlers unwind (finally blocks, an exec: child killed) within this.
CANCEL_WAIT_S = 2.0
# Writing outcomes, then releasing and deregistering: all of it within this, and the
# release always keeps at least RELEASE_RESERVE_S of it.
FINAL_WRITES_S = 10.0
RELEASE_RESERVE_S = 4.0


@dataclass(frozen=True)
class Stopping:
    """What the stop works on (all owned by the supervisor)."""

    worker_id: str
    shutdown_timeout_s: float
    queue: Queue
    claimer: Claimer
    claimer_task: asyncio.Task[None]
    heartbeat: Heartbeat
    inflight: InFlight
    outcomes: Outcomes
    pool: WorkerPool
    notifier: Notifier
    metrics: Metrics


async def stop_gracefully(s: Stopping) -> None:
    s.claimer.stop()
    s.notifier.stopping(f"stopping; {s.inflight.running} in flight")
    log.info(
        "daemon.stopping", in_flight=s.inflight.running, shutdown_timeout_s=s.shutdown_timeout_s
    )
    await asyncio.gather(_claim_answered(s), _handlers_finished(s))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINAL_WRITES_S
    try:
        await asyncio.wait_for(s.outcomes.drain(), timeout=FINAL_WRITES_S - RELEASE_RESERVE_S)
    except TimeoutError:
        log.error(
            "outcomes.unwritten",
            count=s.outcomes.pending,
            note="released below: these chunks will run again",
        )
    try:
        timeout_s = max(RELEASE_RESERVE_S, deadline - loop.time())
        # Heartbeats (and lease renewals) went on while handlers finished; none may follow the
        # deregistration, or it would register this daemon again.
        await s.heartbeat.halt(timeout_s / 2)
        timeout_s = max(RELEASE_RESERVE_S / 2, deadline - loop.time())
        released = await asyncio.wait_for(s.queue.stop_worker(s.worker_id), timeout=timeout_s)
    except (TimeoutError, *DATABASE_ERRORS) as exc:
        log.error(
            "shutdown.db_unreachable",
            error=first_line(exc),
            note="leases will expire and the reaper will return held chunks",
        )
        return
    for row in s.inflight.held_rows():
        s.inflight.settled(row)
    if released:
        s.metrics.released.inc(released)
        log.info("chunks.released", count=released, worker_id=s.worker_id)


async def _claim_answered(s: Stopping) -> None:
    """A claim already sent may have committed: wait for its answer (its rows stay held)."""
    _done, pending = await asyncio.wait({s.claimer_task}, timeout=CLAIM_WAIT_S)
    if pending:
        s.claimer_task.cancel()
        log.warning(
            "claim.unanswered",
            waited_s=CLAIM_WAIT_S,
            note="whatever it claimed is released by worker id below",
        )


async def _handlers_finished(s: Stopping) -> None:
    """Running handlers get ``--shutdown-timeout`` to finish; those still running then are
    cancelled (their chunks are released below), and the workers end."""
    await s.pool.wait_idle(s.shutdown_timeout_s)
    await s.pool.stop(CANCEL_WAIT_S)
