"""What this process holds, and until when it can show that it still holds it.

Each claim goes ``ready`` (claimed, waiting for a slot) → ``running`` (its handler runs) →
``reporting`` (its outcome is queued for writing) and is forgotten once the outcome is written,
fenced out or released. Only held claims are renewed: a chunk that ends without queuing
an outcome is forgotten too, so its lease runs out and the reaper returns the chunk.

A slot frees as soon as the handler returns (the next chunk need not wait for a completion
batch), but the lease is renewed until the outcome is committed.

A claim is one attempt of a chunk: the lease belongs to the attempt, not the chunk. Claims are
keyed by (chunk id, attempt), renewals name both, and a claim of a chunk this process already
holds under an older attempt (the database reaped it: a clock step, a stall) cancels the older
attempt's handler at once; so does a reap of one of our own claims.

Each claim also has a local lease end on this process's monotonic clock: when the claim (or its
last successful renewal) was *sent*, plus the lease. The database's lease cannot end before
it, so a handler still running then is cancelled: the chunk may already run elsewhere. The same
happens at once when a renewal says the chunk is no longer ours, and on resuming from a stall
(a ``SIGSTOP``, a blocked event loop) past the lease's end, since the timer is overdue then.
The same holds for the workers registry: the reaper returns the chunks of a daemon silent for
three heartbeats, so every claim is lost when this process's last heartbeat that got through
was sent that long ago (:meth:`InFlight.alive`).

A running handler also has a deadline of ``--chunk-timeout`` from its start: past it, its task
is cancelled and marked timed out, and the worker turns that into a "timed out" failure. Both
kinds of deadline sit in heaps behind one loop timer each, not a timer (or an
``asyncio.timeout``) per chunk, which cost more than the rest of a chunk's bookkeeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from chunkd.db import ClaimedRow

__all__ = ["Claim", "InFlight"]

log = structlog.get_logger("chunkd.runtime.inflight")

State = Literal["ready", "running", "reporting"]
# Timers may fire a little early (libuv counts milliseconds): deadlines this close are due.
DUE_SLACK_S = 0.002


@dataclass(eq=False, slots=True)
class Claim:
    """One claim this process holds."""

    row: ClaimedRow
    lease_ends_at: float  # loop time (monotonic seconds) by which the lease may be gone
    state: State = "ready"
    task: asyncio.Task[None] | None = None  # while its handler runs
    lost: str | None = None  # why the lease is gone, once it is
    timeout_at: float = math.inf  # loop time at which its handler is cancelled as timed out
    timed_out: bool = False


class _Deadlines:
    """Deadlines of claims, earliest first, behind one loop timer.

    Entries are never removed: ``current(claim, at)`` says whether an entry still stands when
    it comes up (its claim not settled, the deadline not moved); stale ones are dropped then,
    or compacted away when they outnumber the live claims.
    """

    def __init__(
        self,
        current: Callable[[Claim, float], bool],
        due: Callable[[Claim, float], None],
        live: Callable[[], int],
    ) -> None:
        self._current = current
        self._due = due  # (claim, seconds overdue)
        self._live = live
        self._heap: list[tuple[float, int, Claim]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def push(self, at: float, claim: Claim) -> None:
        heapq.heappush(self._heap, (at, next(self._order), claim))
        if len(self._heap) > 2 * self._live() + 256:
            self._heap = [e for e in self._heap if self._current(e[2], e[0])]
            heapq.heapify(self._heap)
        if at < self._timer_at:
            self._schedule()

    def _schedule(self) -> None:
        if not self._heap or self._heap[0][0] >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._heap[0][0]
        self._timer = asyncio.get_running_loop().call_at(self._timer_at, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now + DUE_SLACK_S:
            at, _, claim = heapq.heappop(self._heap)
            if self._current(claim, at):
                self._due(claim, now - at)
        self._schedule()


class InFlight:
    def __init__(
        self, concurrency: int, *, worker_id: str = "", chunk_timeout_s: float = math.inf
    ) -> None:
        self.concurrency = concurrency
        self._worker_id = worker_id
        self._chunk_timeout_s = chunk_timeout_s
        # The slots: (id, attempt) of the claims whose handler runs.
        self._running: set[tuple[int, int]] = set()
        self._claims: dict[tuple[int, int], Claim] = {}  # by (chunk id, attempt)
        self._attempt_of: dict[int, int] = {}  # chunk id -> the attempt held
        self._registry_timer: asyncio.TimerHandle | None = None
        self._lease_ends = _Deadlines(self._lease_current, self._lease_due, self._count)
        self._timeouts = _Deadlines(self._timeout_current, self._timeout_due, self._count)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return self.concurrency - len(self._running)

    # --- the life of a claim -------------------------------------------------------------

    def claimed(self, row: ClaimedRow, lease_ends_at: float) -> None:
        older = self._attempt_of.get(row.id)
        if older is not None and older != row.attempt:
            # The database gave the chunk out again: the older attempt's lease is gone.
            stale = self._claims.get((row.id, older))
            if stale is not None and stale.lost is None:
                self._lose(stale, f"this daemon claimed the chunk again (attempt {row.attempt})")
            self._forget(row.id, older)
        claim = Claim(row, lease_ends_at)
        self._claims[(row.id, row.attempt)] = claim
        self._attempt_of[row.id] = row.attempt
        overdue_s = asyncio.get_running_loop().time() - lease_ends_at
        if overdue_s >= 0:  # the answer came back after the lease (a stall, a slow network)
            self._lose(claim, "the claim's answer came after its lease had run out", overdue_s)
        else:
            self._lease_ends.push(lease_ends_at, claim)

    def holds(self, row: ClaimedRow) -> bool:
        """Still ours as far as this process can tell (not lost, not settled)."""
        claim = self._claims.get((row.id, row.attempt))
        return claim is not None and claim.row is row and claim.lost is None

    def started(self, row: ClaimedRow, task: asyncio.Task[None] | None = None) -> None:
        """Its handler starts in ``task``, which is cancelled at the chunk timeout."""
        self._running.add((row.id, row.attempt))
        claim = self._claim(row)
        if claim is not None:
            claim.state = "running"
            claim.task = task
            if task is not None and self._chunk_timeout_s < math.inf:
                claim.timeout_at = asyncio.get_running_loop().time() + self._chunk_timeout_s
                self._timeouts.push(claim.timeout_at, claim)

    def timed_out(self, row: ClaimedRow) -> bool:
        """Its handler was cancelled at the chunk timeout (and the lease is not lost)."""
        claim = self._claim(row)
        return claim is not None and claim.timed_out and claim.lost is None

    def handler_done(self, row: ClaimedRow) -> None:
        """Its handler returned (or raised): the slot is free."""
        self._running.discard((row.id, row.attempt))
        claim = self._claim(row)
        if claim is not None:
            claim.task = None

    def task_ended(self, row: ClaimedRow) -> None:
        """Its chunk is over in its worker, however it ended (even cancelled): free
        the slot, and unless an outcome was queued, stop renewing the lease."""
        self.handler_done(row)
        claim = self._claim(row)
        if claim is not None and claim.state != "reporting":
            self.settled(row)

    def reporting(self, row: ClaimedRow) -> None:
        """Its outcome is queued: keep renewing until it is written."""
        claim = self._claim(row)
        if claim is not None:
            claim.state = "reporting"

    def settled(self, row: ClaimedRow) -> None:
        """Written, fenced out, released or abandoned: stop renewing the lease."""
        if self._claim(row) is not None:
            self._forget(row.id, row.attempt)

    def _forget(self, chunk_id: int, attempt: int) -> None:
        self._claims.pop((chunk_id, attempt), None)
        if self._attempt_of.get(chunk_id) == attempt:
            del self._attempt_of[chunk_id]

    def reaped(self, queue_id: object, attempt: int, why: str) -> None:
        """The reaper (ours or another's) ended this claim, for ``why`` (its lease had run
        out, its worker missed three heartbeats): if we still hold it, it is lost."""
        for claim in list(self._claims.values()):
            if claim.row.queue_id == queue_id and claim.row.attempt == attempt:
                if claim.lost is None:
                    self._lose(claim, f"the reaper returned the chunk ({why})")
                return

    # --- the workers registry ----------------------------------------------------------------

    def alive(self, sent_at: float, dead_after_s: float) -> None:
        """A heartbeat sent at loop time ``sent_at`` reached the registry: the reaper may take
        this process for dead ``dead_after_s`` after it (three heartbeats), so every claim is
        lost then unless another heartbeat gets through."""
        if self._registry_timer is not None:
            self._registry_timer.cancel()
        self._registry_timer = asyncio.get_running_loop().call_at(
            sent_at + dead_after_s, self._presumed_dead
        )

    def _presumed_dead(self) -> None:
        self._registry_timer = None
        for claim in list(self._claims.values()):
            if claim.lost is None and claim.state != "reporting":
                self._lose(claim, "no heartbeat reached the workers registry for 3 heartbeats")

    def close(self) -> None:
        if self._registry_timer is not None:
            self._registry_timer.cancel()
            self._registry_timer = None

    # --- leases --------------------------------------------------------------------------

    def renewable(self) -> list[Claim]:
        """Claims to renew: ready, running or with an outcome still to write, and not lost."""
        return [claim for claim in self._claims.values() if claim.lost is None]

    def renewed(
        self, sent: list[Claim], renewed: set[tuple[int, int]], lease_ends_at: float
    ) -> None:
        """A renewal sent for ``sent`` came back with the (id, attempt) pairs in ``renewed``:
        move their lease ends; a running or waiting claim missing from the answer is no
        longer ours."""
        for claim in sent:
            key = (claim.row.id, claim.row.attempt)
            if self._claims.get(key) is not claim or claim.lost is not None:
                continue  # settled meanwhile
            if key in renewed:
                claim.lease_ends_at = max(claim.lease_ends_at, lease_ends_at)
                self._lease_ends.push(claim.lease_ends_at, claim)
            elif claim.state != "reporting":
                # (An outcome being written when the renewal ran is not renewed either: its
                # write says whether it was still ours.)
                self._lose(claim, "the database no longer lists this claim as ours")

    def held_rows(self) -> list[ClaimedRow]:
        return [claim.row for claim in self._claims.values()]

    def _claim(self, row: ClaimedRow) -> Claim | None:
        claim = self._claims.get((row.id, row.attempt))
        return claim if claim is not None and claim.row is row else None

    def _count(self) -> int:
        return len(self._claims)

    def _lease_current(self, claim: Claim, at: float) -> bool:
        key = (claim.row.id, claim.row.attempt)
        return self._claims.get(key) is claim and claim.lease_ends_at <= at

    def _lease_due(self, claim: Claim, overdue_s: float) -> None:
        if claim.lost is None and claim.state != "reporting":
            self._lose(claim, "the lease ran out before a renewal came back", overdue_s)

    def _timeout_current(self, claim: Claim, at: float) -> bool:
        return (
            self._claims.get((claim.row.id, claim.row.attempt)) is claim
            and claim.task is not None
            and claim.timeout_at == at
        )

    def _timeout_due(self, claim: Claim, _overdue_s: float) -> None:
        if claim.task is not None and claim.lost is None and not claim.timed_out:
            claim.timed_out = True
            claim.task.cancel()

    def _lose(self, claim: Claim, reason: str, overdue_s: float | None = None) -> None:
        """The chunk may run elsewhere now: cancel its handler, or never start it."""
        claim.lost = reason
        row = claim.row
        fields = row.log_fields(self._worker_id)
        fields["reason"] = reason
        if overdue_s is not None and overdue_s > 0.5:
            fields["overdue_s"] = round(overdue_s, 3)  # woke late: a stall, or SIGSTOP
        if claim.state == "running" and claim.task is not None:
            claim.task.cancel()
            log.warning("chunk.lease_lost", action="handler cancelled", **fields)
        else:
            # Not started yet (prefetched): drop it; the claimer skips what is not held.
            self.settled(row)
            log.warning("chunk.lease_lost", action="not started", **fields)
