"""Returning chunks whose worker died: ``cleanup_stuck_chunks()`` on a timer.

Every daemon runs one; the SQL function uses SKIP LOCKED, so many reapers split the work
instead of fighting over it.
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
        self, queue: Queue, metrics: Metrics, health: DatabaseHealth, *, interval_s: float
    ) -> None:
        self._queue = queue
        self._metrics = metrics
        self._health = health
        self.interval_s = interval_s

    async def run_once(self) -> int:
        reaped = await self._queue.cleanup_stuck_chunks()
        self._health.wrote()
        if reaped:
            self._metrics.reaped.inc(reaped)
            log.warning("chunks.reaped", count=reaped)
        return reaped

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                await self._health.failed("reaper", exc)
            await asyncio.sleep(self.interval_s)
