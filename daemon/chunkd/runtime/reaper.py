"""Returning chunks whose worker died: ``chunkd.reap_expired()`` (what the seed's
``cleanup_stuck_chunks()`` counts) on a timer.

Every daemon runs one; the SQL function uses SKIP LOCKED, so many reapers split the work
instead of fighting over it. Each chunk returned is one ``chunk.reaped`` line (``final``: that
was its last attempt, so it failed for good).
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.observability.metrics import Metrics
from chunkd.runtime.health import DatabaseHealth

__all__ = ["Reaper"]

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
    ) -> None:
        self._queue = queue
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
                reaped_by=self._worker_id,
            )
        return len(reaped)

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                await self._health.failed("reaper", exc)
            await asyncio.sleep(self.interval_s)
