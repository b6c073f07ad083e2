"""Renewing the leases of claims this process still holds, and its row in the workers table.

Runs every lease/3, so two consecutive misses (a Postgres restart, a slow network) still
leave the lease alive. The answer says which claims are still ours: their local lease end
moves to the renewal's send time plus the lease; a running handler whose chunk is missing
from it (reaped after a stall, its job cancelled) is cancelled at once
(:mod:`chunkd.runtime.inflight`). When renewals fail for a whole lease, the local lease end
passes and the handler is cancelled all the same.
"""

from __future__ import annotations

import asyncio

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.inflight import InFlight

__all__ = ["Heartbeat"]


class Heartbeat:
    def __init__(
        self,
        queue: Queue,
        inflight: InFlight,
        health: DatabaseHealth,
        *,
        worker_id: str,
        lease_s: float,
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._health = health
        self._worker_id = worker_id
        self._lease_s = lease_s
        self.interval_s = lease_s / 3

    async def run_once(self) -> int:
        """Renews what is held; returns how many leases were renewed."""
        held = self._inflight.renewable()
        renewed: set[int] = set()
        if held:
            # Measured before sending: the database's new lease cannot end before this.
            sent_at = asyncio.get_running_loop().time()
            ids = [claim.row.id for claim in held]
            renewed = await self._queue.heartbeat(self._worker_id, ids, self._lease_s)
            self._inflight.renewed(held, renewed, sent_at + self._lease_s)
        await self._queue.worker_heartbeat(self._worker_id)
        self._health.wrote()
        return len(renewed)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        while True:
            # At a fixed rate, not a pause after each renewal: a slow answer does not push
            # the next renewal towards the end of the lease.
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.interval_s
            try:
                await self.run_once()
            except DATABASE_ERRORS as exc:
                await self._health.failed("heartbeat", exc)
