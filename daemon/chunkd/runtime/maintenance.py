"""Retention: moving finished jobs to the history and dropping expired history,
``chunkd.retention_round()`` on a timer (``--maintenance-interval``; 0: this daemon does none).

Every daemon runs one, and one daemon at a time does the work: the round takes an advisory lock
in its transaction, and a daemon that finds it taken does nothing (``ran`` False). A round is
bounded (:data:`MAX_CHUNKS` chunks moved); when it says there is more to do (a backlog after an
upgrade, a burst of finished jobs) the next one follows after :data:`BUSY_DELAY_S` instead of
the interval. A round that did something is one ``maintenance.round`` line; an idle one, none.
docs/storage.md, "Retention and history".
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.db.queue import RetentionRound
from chunkd.runtime.health import DatabaseHealth

__all__ = ["BUSY_DELAY_S", "DEFAULT_INTERVAL_S", "MAX_CHUNKS", "Maintenance"]

#: Seconds between two rounds (``--maintenance-interval``).
DEFAULT_INTERVAL_S = 10.0
#: Chunks one round moves at most (a job with more moves in pieces, its row last).
MAX_CHUNKS = 5000
#: Seconds until the next round when the last one left work behind.
BUSY_DELAY_S = 0.1

log = structlog.get_logger("chunkd.runtime.maintenance")


class Maintenance:
    def __init__(
        self,
        queue: Queue,
        health: DatabaseHealth,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_chunks: int = MAX_CHUNKS,
        worker_id: str,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("the maintenance interval must be positive")
        if max_chunks < 1:
            raise ValueError("a maintenance round moves at least one chunk")
        self._queue = queue
        self._health = health
        self._worker_id = worker_id
        self.interval_s = interval_s
        self.max_chunks = max_chunks

    async def run_once(self) -> RetentionRound:
        """One bounded round; returns what it did (``ran`` False: another daemon's round held
        the lock, nothing was done)."""
        report = await self._queue.retention_round(self.max_chunks)
        self._health.wrote()
        if report.did_something:
            log.info(
                "maintenance.round",
                moved_jobs=report.moved_jobs,
                moved_chunks=report.moved_chunks,
                expired_jobs=report.expired_jobs,
                created_partitions=report.created_partitions,
                dropped_partitions=report.dropped_partitions,
                more=report.more,
                worker_id=self._worker_id,
            )
        return report

    async def run(self) -> None:
        while True:
            delay_s = self.interval_s
            try:
                if (await self.run_once()).more:
                    delay_s = BUSY_DELAY_S
            except DATABASE_ERRORS as exc:
                await self._health.failed("maintenance", exc)
            await asyncio.sleep(delay_s)
