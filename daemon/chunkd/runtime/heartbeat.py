"""Renewing the leases of claims this process still holds, and its row in the workers table.

Runs every lease/3, so two consecutive misses (a Postgres restart, a slow network) still
leave the lease alive.
"""

from __future__ import annotations

import asyncio

import structlog

from chunkd.db import TRANSIENT_ERRORS, Queue
from chunkd.runtime.inflight import InFlight

__all__ = ["Heartbeat"]

log = structlog.get_logger("chunkd.runtime.heartbeat")


class Heartbeat:
    def __init__(self, queue: Queue, inflight: InFlight, *, worker_id: str, lease_s: float) -> None:
        self._queue = queue
        self._inflight = inflight
        self._worker_id = worker_id
        self._lease_s = lease_s
        self.interval_s = lease_s / 3

    async def run_once(self) -> int:
        held = self._inflight.held()
        renewed: set[int] = set()
        if held:
            renewed = await self._queue.heartbeat(self._worker_id, held, self._lease_s)
            still_held = set(self._inflight.held()).intersection(held)
            if len(renewed) < len(still_held):
                # Either finished while this statement ran, or lost (reaped after a stall, job
                # cancelled). A real loss is logged as chunk.fenced when its outcome comes.
                log.info(
                    "lease.not_renewed",
                    held=len(still_held),
                    renewed=len(renewed),
                    worker_id=self._worker_id,
                )
        await self._queue.worker_heartbeat(self._worker_id)
        return len(renewed)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.run_once()
            except TRANSIENT_ERRORS as exc:
                log.warning("heartbeat.failed", error=str(exc) or type(exc).__name__)
