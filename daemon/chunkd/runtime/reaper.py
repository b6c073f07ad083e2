"""Returning chunks whose worker died: ``chunkd.reap_attempts()`` (what the seed's
``cleanup_stuck_chunks()`` counts) on a timer, and pruning the workers registry.

Every daemon runs one; the SQL function uses SKIP LOCKED, so many reapers split the work
instead of fighting over it. Each chunk returned is one ``chunk.reaped`` line (``final``: that
was its last attempt, so it failed for good; ``reason``: its lease had run out, or its worker
missed three heartbeats). A chunk of this very daemon that it reaps (its lease ran out on the
database clock: a clock step, a stall) has its handler cancelled at once, with that reason.
Registry rows of daemons not heard from for ``PRUNE_AFTER_S`` and holding nothing are removed.
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.observability.metrics import Metrics
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.heartbeat import REGISTRY_MISSES
from chunkd.runtime.inflight import InFlight

__all__ = ["PRUNE_AFTER_S", "REAP_REASONS", "Reaper"]

#: Registry rows of daemons silent this long (seconds) that hold nothing are removed.
PRUNE_AFTER_S = 900.0
#: Why the reaper ended an attempt, by the rule ``chunkd.reap_attempts()`` names.
REAP_REASONS = {
    "lease": "its lease had run out",
    "worker": f"its worker missed {REGISTRY_MISSES} heartbeats",
}

log = structlog.get_logger("chunkd.runtime.reaper")


class Reaper:
    def __init__(
        self,
        queue: Queue,
        metrics: Metrics,
        health: DatabaseHealth,
        *,
        interval_s: float,
        worker_id: str,
        inflight: InFlight | None = None,
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._worker_id = worker_id
        self._metrics = metrics
        self._health = health
        self.interval_s = interval_s

    async def run_once(self) -> int:
        """Reaps once; returns how many chunks were reaped."""
        reaped = await self._queue.reap_expired()
        self._health.wrote()
        if reaped:
            self._metrics.reaped.inc(len(reaped))
        for row in reaped:
            why = REAP_REASONS.get(row["rule"], row["rule"])
            log.warning(
                "chunk.reaped",
                sync_job_id=str(row["sync_job_id"]),
                chunk_id=str(row["chunk_id"]),
                queue_id=str(row["queue_id"]),
                seq=row["seq"],
                attempt=row["attempt"],
                kind=row["kind"],
                worker_id=row["worker_id"],  # the lease's holder: it died, hung or lost us
                final=row["final"],
                reason=why,
                reaped_by=self._worker_id,
            )
            if self._inflight is not None and row["worker_id"] == self._worker_id:
                self._inflight.reaped(row["queue_id"], row["attempt"], why)
        pruned = await self._queue.prune_workers(PRUNE_AFTER_S)
        if pruned:
            log.info("workers.pruned", workers=pruned, silent_for_s=PRUNE_AFTER_S)
        return len(reaped)

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                await self._health.failed("reaper", exc)
            await asyncio.sleep(self.interval_s)
