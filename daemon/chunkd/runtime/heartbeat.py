"""Renewing the leases of claims this process still holds, and its row in the workers registry.

Leases are renewed every lease/3, so two consecutive misses (a Postgres restart, a slow
network) still leave the lease alive. The answer says which claims (chunk, attempt) are still
ours: their local lease end moves to the renewal's send time plus the lease; a running handler
whose claim is missing from it (reaped after a stall, its job cancelled) is cancelled at once
(:mod:`chunkd.runtime.inflight`). When renewals fail for a whole lease, the local lease end
passes and the handler is cancelled all the same.

The registry row is heartbeated more often, every ``heartbeat_s`` (at most 5 s): the reaper
returns the chunks of a daemon that missed three heartbeats without waiting for each lease, and
this process gives its claims up at the same moment on its own clock if its heartbeats stop
getting through. A heartbeat that finds the row gone (pruned while this process was stopped or
the database clock stepped ahead) registers it again. Each heartbeat also reads the database
clock: a step between it and this host's monotonic clock (one of the two clocks was set) is
logged once per step, since leases and reaps follow the database clock.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog

from chunkd.db import DATABASE_ERRORS, Queue, WorkerRegistration
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.inflight import InFlight

__all__ = ["CLOCK_STEP_S", "REGISTRY_HEARTBEAT_MAX_S", "REGISTRY_MISSES", "Heartbeat"]

log = structlog.get_logger("chunkd.runtime.heartbeat")

#: The registry heartbeat's longest interval, seconds (lease/3 when shorter).
REGISTRY_HEARTBEAT_MAX_S = 5.0
#: Heartbeats a daemon may miss before the reaper takes it for dead (chunkd.reap_expired).
REGISTRY_MISSES = 3
#: A difference this large between how far the database clock and this host's monotonic clock
#: moved from one heartbeat to the next is a clock step, logged (seconds).
CLOCK_STEP_S = 1.0


class Heartbeat:
    def __init__(
        self,
        queue: Queue,
        inflight: InFlight,
        health: DatabaseHealth,
        *,
        worker: WorkerRegistration,
        lease_s: float,
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._health = health
        self._worker = worker
        self._worker_id = worker.worker_id
        self._lease_s = lease_s
        self.lease_interval_s = lease_s / 3
        self.interval_s = min(self.lease_interval_s, REGISTRY_HEARTBEAT_MAX_S)
        self._next_renewal = 0.0
        self._clock: tuple[float, datetime] | None = None  # (loop time sent, database clock)
        # Held while a round is in flight; once halted, no round starts (see halt()).
        self._round = asyncio.Lock()
        self._halted = False

    async def renew_leases(self) -> int:
        """Renews what is held; returns how many leases were renewed."""
        held = self._inflight.renewable()
        if not held:
            return 0
        # Measured before sending: the database's new lease cannot end before this.
        sent_at = asyncio.get_running_loop().time()
        claims = [(claim.row.id, claim.row.attempt) for claim in held]
        renewed = await self._queue.heartbeat(self._worker_id, claims, self._lease_s)
        self._inflight.renewed(held, renewed, sent_at + self._lease_s)
        return len(renewed)

    async def beat(self) -> None:
        """The registry heartbeat: this process is alive (and the clocks agree)."""
        sent_at = asyncio.get_running_loop().time()
        db_clock = await self._queue.worker_alive(self._worker, self.interval_s)
        # Always armed, even when it equals the lease: claims and renewals made after this
        # heartbeat end later than it, and the reaper takes this daemon for dead from here.
        self._inflight.alive(sent_at, REGISTRY_MISSES * self.interval_s)
        self._check_clock(sent_at, db_clock)

    async def run_once(self) -> int:
        """Renews the leases (when due) and heartbeats; returns how many leases were renewed."""
        loop = asyncio.get_running_loop()
        renewed = 0
        if loop.time() >= self._next_renewal:
            self._next_renewal = loop.time() + self.lease_interval_s
            renewed = await self.renew_leases()
        await self.beat()
        self._health.wrote()
        return renewed

    def _check_clock(self, sent_at: float, db_clock: datetime) -> None:
        previous, self._clock = self._clock, (sent_at, db_clock)
        if previous is None:
            return
        local_s = sent_at - previous[0]
        database_s = (db_clock - previous[1]).total_seconds()
        step_s = database_s - local_s  # a round trip's jitter at most, unless a clock was set
        if abs(step_s) >= CLOCK_STEP_S:
            log.warning(
                "clock.step",
                step_s=round(step_s, 3),
                meaning=(
                    "the database clock moved this much further than this host's monotonic "
                    "clock between two heartbeats (one of them was set): leases and reaps "
                    "follow the database clock"
                ),
                worker_id=self._worker_id,
            )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # The first at once: the registry learns how often this daemon heartbeats.
        next_at = loop.time()
        self._next_renewal = loop.time() + self.lease_interval_s
        while True:
            # At a fixed rate, not a pause after each renewal: a slow answer does not push
            # the next renewal towards the end of the lease.
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.interval_s
            async with self._round:
                if self._halted:
                    return
                try:
                    await self.run_once()
                except DATABASE_ERRORS as exc:
                    await self._health.failed("heartbeat", exc)

    async def halt(self, timeout_s: float) -> None:
        """No heartbeat after this returns: a round in flight is waited for (at most
        ``timeout_s`` seconds), so the server has run it before whatever the caller sends next.
        The stop calls it right before it deregisters: a heartbeat after that would register
        this stopped daemon again (worker_alive registers a row it finds gone)."""
        self._halted = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._round.acquire()
        except TimeoutError:
            return  # the database does not answer: neither will it to the deregistration
        self._round.release()
