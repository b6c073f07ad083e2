"""Returning chunks whose worker died: ``cleanup_stuck_chunks()`` on a timer.

Every daemon runs one; the SQL function uses SKIP LOCKED, so many reapers split the work
instead of fighting over it.
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import TRANSIENT_ERRORS, Queue
from chunkd.observability.metrics import Metrics

__all__ = ["Reaper"]

log = structlog.get_logger("chunkd.runtime.reaper")


class Reaper:
    def __init__(self, queue: Queue, metrics: Metrics, *, interval_s: float) -> None:
        self._queue = queue
        self._metrics = metrics
        self.interval_s = interval_s

    async def run_once(self) -> int:
        reaped = await self._queue.cleanup_stuck_chunks()
        if reaped:
            self._metrics.reaped.inc(reaped)
            log.warning("chunks.reaped", count=reaped)
        return reaped

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except TRANSIENT_ERRORS as exc:
                log.warning("reaper.failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self.interval_s)
