"""The claim loop: one statement claims as many chunks as there are free slots, plus a few.

It sleeps until something says work may be there: a NOTIFY, a timer armed for the earliest
future ``run_at``, the safety poll, a (re)connect of the listener, or a slot freed after a
claim that came back full (so more is likely queued). A claim that comes back short means
the queue is drained for us, and we wait for the next signal instead of polling.

Rate limits: a claim cut short by a rate limit comes back with the time the database expects
tokens for us (a turn: the daemons of a fleet are given turns one after another, so they do
not all wake at once). One such timer is kept, and its time left is sent with every claim: a
claimer that already holds a turn is not given another by claims made in between.

Prefetch: a claim takes a round trip (and a WAL flush), so a slot refilled only after its
handler returned sits idle for that long. When handlers are short compared with a claim, the
claimer keeps a few chunks ready: as many as the slots would free during a few claims,
measured (moving averages of claim time and of handler time per kind, the slowest kind
counting), never more than twice the concurrency. Long handlers get no prefetch, so one
process does not hoard chunks another could run. A prefetched chunk never holds what others
need: the claim takes work under flow control (a job's ``max_concurrency`` slot, a concurrency
key's slot, a rate token) only for the slots that can start now, and a prefetched chunk not
started within ``PREFETCH_HOLD_S`` is handed back without spending its attempt.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from chunkd.db import DATABASE_ERRORS, ClaimedRow, Queue
from chunkd.observability.metrics import Metrics
from chunkd.runtime.health import DatabaseHealth
from chunkd.runtime.inflight import InFlight

__all__ = ["Claimer"]

log = structlog.get_logger("chunkd.runtime.claimer")

# After a slot frees while a backlog remains, wait this long for more slots so claims come in
# batches rather than one statement per finished chunk.
BATCH_WAIT_S = 0.002
MAX_CLAIM = 500
# Future due times remembered for the timer; beyond this the safety poll covers the rest.
MAX_TIMERS = 10_000
# Weight of the newest sample in the moving averages behind the prefetch.
EWMA_ALPHA = 0.1
# A prefetched chunk not started this long after its claim is handed back (no attempt spent):
# it was meant to start within a few claims' time (milliseconds), and another daemon may be
# idle. Handler time assumed for a daemon that has measured none yet (no prefetch).
PREFETCH_HOLD_S = 1.0
UNMEASURED_HANDLER_S = 10.0
# Added to every timer: uvloop's timers count whole milliseconds from a cached loop time and
# were measured firing up to 0.4 ms early; a claim that runs before run_at finds nothing due,
# and the chunks would then wait for the safety poll.
TIMER_SLACK_S = 0.002


class _MovingAverage:
    """The plain mean over the first samples, then an exponential moving average: the start-up
    guess is forgotten after one sample instead of dragging on for dozens."""

    def __init__(self, guess: float) -> None:
        self.value = guess
        self._samples = 0

    def add(self, sample: float) -> None:
        self._samples += 1
        self.value += max(EWMA_ALPHA, 1 / self._samples) * (sample - self.value)


class Claimer:
    def __init__(
        self,
        queue: Queue,
        inflight: InFlight,
        metrics: Metrics,
        health: DatabaseHealth,
        *,
        worker_id: str,
        kinds: Sequence[str],
        lease_s: float,
        wake_workers: Callable[[int], None],
    ) -> None:
        self._queue = queue
        self._inflight = inflight
        self._metrics = metrics
        self._claimed_by_kind: dict[str, Any] = {}  # labels() takes a lock: resolve once
        self._health = health
        self._worker_id = worker_id
        self._kinds = list(kinds)
        self._lease_s = lease_s
        self._wake_workers = wake_workers
        self._wake = asyncio.Event()
        self._maybe_more = True
        self._backlog = False  # the last claim came back full
        self._timer: asyncio.TimerHandle | None = None
        self._due: list[float] = []  # heap of loop times at which retries become due
        self._turn: asyncio.TimerHandle | None = None  # rate limits: when to come back
        self._turn_at: float | None = None
        self._stopped = False
        self._min_batch = max(1, inflight.concurrency // 4)
        # Claimed, waiting for a slot: (row, loop time of its claim), oldest first.
        self._ready: deque[tuple[ClaimedRow, float]] = deque()
        self._release_timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self._claim_s = _MovingAverage(0.005)
        self._handler_s: dict[str, _MovingAverage] = {}  # per kind, once measured
        self._prefetch_paused = False  # a prefetched chunk waited too long: until a slot frees

    @property
    def handler_s(self) -> float:
        """The handler time prefetch plans with: the slowest kind measured, in seconds."""
        if not self._handler_s:
            return UNMEASURED_HANDLER_S
        return max(average.value for average in self._handler_s.values())

    @property
    def prefetch(self) -> int:
        """Chunks to hold beyond the slots: those that free during three refills."""
        if self._prefetch_paused:
            return 0
        concurrency = self._inflight.concurrency
        # Slots free at concurrency/handler_s per second; a refill takes the batching wait
        # plus a claim (a WAL flush: milliseconds, whatever the batch size). Keep three
        # refills' worth, so the ready queue does not run dry between claims.
        refill_s = BATCH_WAIT_S + self._claim_s.value
        expected = int(3 * concurrency * refill_s / max(self.handler_s, 1e-4))
        return min(2 * concurrency, expected)

    def _slots(self) -> int:
        """Claims that could start at once: free slots no ready chunk will take."""
        return max(0, self._inflight.free_slots - len(self._ready))

    def _wanted(self) -> int:
        # Chunks whose handler returned do not count: their completion is on its way, and
        # waiting for it would idle the slot for a round trip.
        capacity = self._inflight.concurrency + self.prefetch
        return min(MAX_CLAIM, capacity - self._inflight.running - len(self._ready))

    # --- signals -----------------------------------------------------------------------

    def work_signalled(self) -> None:
        """Something outside says chunks may be runnable now."""
        self._maybe_more = True
        self._wake.set()

    def on_notify(self, payload: str) -> None:
        try:
            due_in_s = float(payload)
        except ValueError:
            due_in_s = 0.0
        if due_in_s <= 0.001:
            self.work_signalled()
        else:
            self.arm_timer(due_in_s)

    def arm_timer(self, due_in_s: float) -> None:
        loop = asyncio.get_running_loop()
        if len(self._due) < MAX_TIMERS:
            heapq.heappush(self._due, loop.time() + due_in_s + TIMER_SLACK_S)
        self._schedule_next()

    def _schedule_next(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._due and not self._stopped:
            self._timer = asyncio.get_running_loop().call_at(self._due[0], self._timer_fired)

    def _timer_fired(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        self._timer = None
        self._schedule_next()
        self.work_signalled()

    def _take_turn(self, wait_s: float) -> None:
        """The database said: rate limits held chunks back, come back in ``wait_s``."""
        if self._turn is not None:
            self._turn.cancel()
        loop = asyncio.get_running_loop()
        self._turn_at = loop.time() + wait_s
        self._turn = loop.call_at(self._turn_at, self._turn_came)

    def _turn_came(self) -> None:
        self._turn = None
        self._turn_at = None
        self.work_signalled()

    def _turn_left_s(self) -> float | None:
        if self._turn_at is None:
            return None
        left = self._turn_at - asyncio.get_running_loop().time()
        return left if left > 0 else None

    def slot_freed(self, kind: str, handler_s: float) -> None:
        self._prefetch_paused = False
        average = self._handler_s.get(kind)
        if average is None:
            average = self._handler_s[kind] = _MovingAverage(handler_s)
        average.add(handler_s)
        # (The worker whose slot freed takes the next ready chunk itself: nothing to wake.)
        if self._backlog:
            self._maybe_more = True
            self._wake.set()

    def take(self) -> ClaimedRow | None:
        """The next ready chunk for a worker to start (skipping any whose lease is gone), or
        None: the pool's workers call it as soon as they are free."""
        while self._ready and not self._stopped:
            row, _claimed_at = self._ready.popleft()
            if self._inflight.holds(row):
                return row
        return None

    def _dispatch(self) -> None:
        """Wakes idle workers for the ready chunks."""
        if self._ready and not self._stopped:
            self._wake_workers(len(self._ready))
        self._arm_release()

    def _arm_release(self) -> None:
        """A timer for the oldest ready chunk's hold. One at a time, never moved (that would
        cost a timer per chunk): when it fires it releases what is stale and re-arms for the
        oldest chunk left."""
        if self._release_timer is None and self._ready and not self._stopped:
            at = self._ready[0][1] + PREFETCH_HOLD_S
            self._release_timer = asyncio.get_running_loop().call_at(at, self._release_stale)

    def _release_stale(self) -> None:
        """Hands back the ready chunks held past ``PREFETCH_HOLD_S`` (no attempt spent)."""
        self._release_timer = None
        now = asyncio.get_running_loop().time()
        stale: list[ClaimedRow] = []
        while self._ready and self._ready[0][1] + PREFETCH_HOLD_S <= now + 0.002:
            row, _claimed_at = self._ready.popleft()
            if self._inflight.holds(row):
                self._inflight.settled(row)
                stale.append(row)
        if stale:
            # Handlers here outlast the prefetch: take no more than free slots until one frees
            # (or this daemon would claim back what it just handed to an idle one).
            self._prefetch_paused = True
            task = asyncio.get_running_loop().create_task(self._release(stale))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        self._arm_release()

    async def _release(self, rows: list[ClaimedRow]) -> None:
        try:
            released = await self._queue.release(self._worker_id, [r.id for r in rows])
        except DATABASE_ERRORS as exc:
            # Not renewed any more: their leases run out and the reaper returns them.
            await self._health.failed("release", exc)
            return
        log.info(
            "prefetch.released",
            chunks=released,
            reason=f"not started within {PREFETCH_HOLD_S:g}s of the claim",
            worker_id=self._worker_id,
        )

    def stop(self) -> None:
        self._stopped = True
        if self._release_timer is not None:
            self._release_timer.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._turn is not None:
            self._turn.cancel()
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------

    async def arm_from_database(self) -> None:
        """After a (re)connect: NOTIFYs may have been missed, so look and poll at once."""
        due_in_s = await self._queue.next_due_in(self._kinds)
        if due_in_s is not None:
            self.on_notify(str(due_in_s))
        self.work_signalled()

    async def run(self) -> None:
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            if self._backlog and 0 < self._wanted() < self._min_batch:
                await asyncio.sleep(BATCH_WAIT_S)
            while self._maybe_more and not self._stopped and self._wanted() > 0:
                await self._claim_once()

    async def _claim_once(self) -> None:
        wanted = self._wanted()
        slots = self._slots()
        # Cleared before the statement: a NOTIFY arriving while it runs sets it again.
        self._maybe_more = False
        started = time.perf_counter()
        # The lease cannot end before the claim was sent plus the lease, on our own clock.
        lease_ends_at = asyncio.get_running_loop().time() + self._lease_s
        try:
            claim = await self._queue.claim(
                self._worker_id,
                wanted,
                self._kinds,
                self._lease_s,
                waiting_s=self._turn_left_s(),
                slots=slots,
            )
        except DATABASE_ERRORS as exc:
            await self._health.failed("claim", exc)
            self._maybe_more = True
            await asyncio.sleep(0.5)
            return
        self._health.wrote()
        self._claim_s.add(time.perf_counter() - started)
        rows = claim.rows
        slot_needed = claim.wait_s is not None and claim.wait_s < 0
        if claim.wait_s is not None and not slot_needed and not self._stopped:
            self._take_turn(claim.wait_s)
        # A full claim: more is likely queued, claim on. Work waiting for a free slot of ours:
        # claim again as soon as one frees (not before: the claim would come back the same).
        full = len(rows) == wanted
        self._backlog = full or slot_needed
        if full:
            self._maybe_more = True
        log_claims = log.is_enabled_for(logging.DEBUG)  # skip building fields when off
        if log_claims:
            log.debug(
                "claim.done",
                wanted=wanted,
                slots=slots,
                claimed=len(rows),
                wait_s=claim.wait_s,
                running=self._inflight.running,
                ready=len(self._ready),
                prefetch=self.prefetch,
                claim_ms=round(self._claim_s.value * 1000, 3),
                handler_ms=round(self.handler_s * 1000, 3),
            )
        claimed_at = asyncio.get_running_loop().time()
        for row in rows:
            self._inflight.claimed(row, lease_ends_at)
            self._ready.append((row, claimed_at))
            counter = self._claimed_by_kind.get(row.kind)
            if counter is None:
                counter = self._claimed_by_kind[row.kind] = self._metrics.claimed.labels(row.kind)
            counter.inc()
            if log_claims:
                log.debug(
                    "chunk.claimed",
                    sync_job_id=str(row.sync_job_id),
                    chunk_id=str(row.chunk_id),
                    queue_id=str(row.queue_id),
                    seq=row.seq,
                    attempt=row.attempt,
                    kind=row.kind,
                    worker_id=self._worker_id,
                )
        self._dispatch()
