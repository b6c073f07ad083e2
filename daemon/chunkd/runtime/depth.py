"""Sampling queue depth into the ``chunkd_queue_depth`` gauge on a timer.

A scrape never queries the database: Prometheus may scrape every few seconds from several
servers, and N daemons each answering with a ``count(*)`` would turn monitoring into load.
Instead each daemon with ``--metrics-port`` samples ``queue_depth()`` once per interval
(15 s by default, about one scrape interval) and the scrape reads the last sample.
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.observability.metrics import Metrics

__all__ = ["DEFAULT_INTERVAL_S", "DEPTH_STATUSES", "QueueDepthSampler"]

log = structlog.get_logger("chunkd.runtime.depth")

DEFAULT_INTERVAL_S = 15.0
# What queue_depth() reports; each is always exported, so a status that empties drops to 0
# instead of keeping its last non-zero value (or vanishing, which breaks alert expressions).
DEPTH_STATUSES = ("pending", "paused", "throttled", "scheduled", "processing")


class QueueDepthSampler:
    def __init__(
        self, queue: Queue, metrics: Metrics, *, interval_s: float = DEFAULT_INTERVAL_S
    ) -> None:
        if interval_s <= 0:
            raise ValueError("the queue depth sampling interval must be positive")
        self._queue = queue
        self._metrics = metrics
        self.interval_s = interval_s

    async def run_once(self) -> dict[str, int]:
        depth = await self._queue.queue_depth()
        for status in (*DEPTH_STATUSES, *(s for s in depth if s not in DEPTH_STATUSES)):
            self._metrics.queue_depth.labels(status).set(depth.get(status, 0))
        return depth

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                # Keep the last sample: a stale gauge beats a gap while Postgres restarts.
                log.warning("depth.sample_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self.interval_s)
