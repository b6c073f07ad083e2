"""The fairness check of the chaos soak (``bench/chaos.py``): no job waits longer for its next
claim than the bound of docs/guarantees.md ("Fair turns").

The bound: with one daemon, between two claims of a job that has runnable chunks, any other
job of its priority is claimed at most twice, so a job waits at most 2 x (J - 1) claims, J
being the jobs with runnable chunks at its priority; each claim in flight on another daemon
can add up to its batch (at most three times that daemon's ``--concurrency``).

What is counted, from the claims alone (``chunkd.attempts``):

* A claim statement is the claims one daemon made at one ``claimed_at``; statements are
  ordered by ``claimed_at``. Within a statement chunks are taken by turn then chunk id, so a
  claim's place there is known when its turn is (``Claim.turn``: the soak reads each job's
  first turn when it enqueues it, so every first claim of its jobs has one); a claim whose
  turn is unknown is counted against the waiting job wherever it could have been.
* A job's wait is measured between two consecutive statements that took chunks of it: the
  first claims (``n = 1``; chunks coming back, which rejoin at the current turn, are not
  counted) of other jobs of its priority made in between, at moments when the job could run.
  A job could run while it had a chunk enqueued and never claimed (chunks coming back are not
  looked at: a wait only they could end is not measured) and, under a limit, while its limit
  had room: its ``max_concurrency`` and its concurrency key counted over the claims in
  flight, and, for a ``max_concurrency`` job, none of its chunks waiting to come back (a retry's
  backoff, a lease running out: they hold back its later chunks).
* J counts the jobs of that priority created before the wait ended and not finished before it
  began (an over-count: some of them may have had nothing runnable).
* S is the slack for claims in flight elsewhere: three times ``--concurrency`` for every other
  daemon alive during the wait (every daemon but the one whose claim ended it). For a job
  under a limit the wait begins when its slot frees, which a claim already under way on any
  daemon does not see, the one that freed it included: S counts every daemon alive.

The check fails as soon as one wait exceeds 2 x (J - 1) + S; ``tests/test_chaos_fairness.py``
shows it failing on a claim order that starves a job.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise

__all__ = ["Claim", "Job", "Life", "Wait", "waits", "worst"]

# Outcomes after which the chunk is terminal; after any other (a retry, a reap, a release, a
# snooze) it comes back, and holds back the later chunks of a max_concurrency job meanwhile.
TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Claim:
    """One row of ``chunkd.attempts``: a chunk's ``n``-th claim, by daemon ``daemon`` (pid)."""

    job: int
    chunk: int
    n: int
    at: datetime
    daemon: int
    ended_at: datetime | None = None
    outcome: str | None = None
    turn: int | None = None  # the chunk's turn when claimed, if known


@dataclass(frozen=True)
class Job:
    """A job as the check needs it; ``chunks`` maps each chunk id to when it was enqueued."""

    id: int
    label: str
    created_at: datetime
    finished_at: datetime | None
    chunks: Mapping[int, datetime]
    priority: int = 0
    max_concurrency: int | None = None
    key: str | None = None

    @property
    def limited(self) -> bool:
        return self.max_concurrency is not None or self.key is not None


@dataclass(frozen=True)
class Life:
    """A daemon's life (``ended_at`` None: alive to the end) and its largest claim."""

    pid: int
    started_at: datetime
    ended_at: datetime | None
    batch: int


@dataclass(frozen=True)
class Wait:
    """The claims of other jobs between two claims of one job, and the bound they must meet."""

    job: int
    label: str
    limited: bool
    start: datetime
    end: datetime
    others: int  # first claims of other jobs of its priority while it could run
    jobs: int  # J
    daemons: int  # daemons alive during the wait
    slack: int  # S

    @property
    def bound(self) -> int:
        return 2 * (self.jobs - 1) + self.slack

    @property
    def ok(self) -> bool:
        return self.others <= self.bound


class _Counter:
    """How many of a set of intervals [start, end) are open at a moment: ``after`` says
    whether a start at that very moment counts (a claim of the statement being looked at)."""

    def __init__(self, intervals: Iterable[tuple[datetime, datetime | None]]) -> None:
        pairs = list(intervals)
        self._starts = sorted(s for s, _ in pairs)
        self._ends = sorted(e for _, e in pairs if e is not None)

    def open(self, at: datetime, *, after: bool) -> int:
        count = bisect.bisect_right if after else bisect.bisect_left
        return count(self._starts, at) - count(self._ends, at)


@dataclass
class _Runnable:
    """When a job could be claimed (see the module's docstring)."""

    job: Job
    fresh: _Counter  # its chunks from enqueued to first claimed
    in_flight: _Counter | None = None  # its own claims (max_concurrency)
    key_in_flight: _Counter | None = None  # the claims of its key's jobs
    key_limit: int | None = None
    coming_back: _Counter | None = None  # its chunks from an outcome that is not final on

    def at(self, t: datetime, *, after: bool) -> bool:
        if self.fresh.open(t, after=after) <= 0:
            return False
        limit = self.job.max_concurrency
        if self.in_flight is not None and limit is not None:
            if self.in_flight.open(t, after=after) >= limit:
                return False
            if self.coming_back is not None and self.coming_back.open(t, after=after) > 0:
                return False
        if self.key_in_flight is not None and self.key_limit is not None:
            return self.key_in_flight.open(t, after=after) < self.key_limit
        return True


@dataclass
class _Statement:
    at: datetime
    daemon: int
    claims: list[Claim] = field(default_factory=list)


def _place(claim: Claim) -> tuple[int, int] | None:
    return None if claim.turn is None else (claim.turn, claim.chunk)


def _runnables(
    claims: Sequence[Claim], jobs: Mapping[int, Job], key_limits: Mapping[str, int]
) -> dict[int, _Runnable]:
    first: dict[int, datetime] = {}
    by_job: dict[int, list[Claim]] = defaultdict(list)
    by_chunk: dict[int, list[Claim]] = defaultdict(list)
    for c in sorted(claims, key=lambda c: (c.at, c.n)):
        first.setdefault(c.chunk, c.at)
        by_job[c.job].append(c)
        by_chunk[c.chunk].append(c)
    by_key: dict[str, list[Claim]] = defaultdict(list)
    for job in jobs.values():
        if job.key is not None and job.key in key_limits:
            by_key[job.key].extend(by_job[job.id])
    out: dict[int, _Runnable] = {}
    for job in jobs.values():
        r = _Runnable(job, _Counter((at, first.get(chunk)) for chunk, at in job.chunks.items()))
        if job.max_concurrency is not None:
            r.in_flight = _Counter((c.at, c.ended_at) for c in by_job[job.id])
            back: list[tuple[datetime, datetime | None]] = []
            for c in by_job[job.id]:
                if c.ended_at is not None and c.outcome not in TERMINAL:
                    later = [x.at for x in by_chunk[c.chunk] if x.n > c.n]
                    back.append((c.ended_at, min(later) if later else None))
            r.coming_back = _Counter(back)
        if job.key is not None and job.key in key_limits:
            r.key_in_flight = _Counter((c.at, c.ended_at) for c in by_key[job.key])
            r.key_limit = key_limits[job.key]
        out[job.id] = r
    return out


def _statements(claims: Sequence[Claim]) -> list[_Statement]:
    by: dict[tuple[datetime, int], _Statement] = {}
    for c in claims:
        by.setdefault((c.at, c.daemon), _Statement(c.at, c.daemon)).claims.append(c)
    return [by[k] for k in sorted(by)]


def waits(
    claims: Sequence[Claim],
    jobs: Mapping[int, Job],
    lives: Sequence[Life],
    key_limits: Mapping[str, int] | None = None,
) -> list[Wait]:
    """Every wait of every job between two consecutive claim statements that took its chunks.

    ``claims`` of jobs not in ``jobs`` are ignored; ``lives`` are the daemons (their batch: three
    times their ``--concurrency``); ``key_limits`` the concurrency keys' limits.
    """
    claims = [c for c in claims if c.job in jobs]
    statements = _statements(claims)
    runnable = _runnables(claims, jobs, key_limits or {})
    created: dict[int, list[datetime]] = defaultdict(list)
    finished: dict[int, list[datetime]] = defaultdict(list)
    for job in jobs.values():
        created[job.priority].append(job.created_at)
        if job.finished_at is not None:
            finished[job.priority].append(job.finished_at)
    for times in (*created.values(), *finished.values()):
        times.sort()
    # Per statement: its first claims of each priority.
    firsts: list[dict[int, int]] = []
    of_job: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(statements):
        count: dict[int, int] = defaultdict(int)
        for c in s.claims:
            if c.n == 1:
                count[jobs[c.job].priority] += 1
            if not of_job[c.job] or of_job[c.job][-1] != i:
                of_job[c.job].append(i)
        firsts.append(count)

    out: list[Wait] = []
    for job_id, indexes in of_job.items():
        job, can_run = jobs[job_id], runnable[job_id]
        for i, j in pairwise(indexes):
            a, b = statements[i], statements[j]
            others = 0
            # The statement that took its chunk: what it took after the job's last chunk.
            if can_run.at(a.at, after=True):
                # (Its claims of unknown place are taken to come first: an over-count.)
                known = [p for c in a.claims if c.job == job_id and (p := _place(c)) is not None]
                last = max(known) if known else None
                others += sum(
                    1
                    for c in a.claims
                    if _counts(c, job, jobs)
                    and (last is None or (p := _place(c)) is None or p > last)
                )
            for k in range(i + 1, j):
                s = statements[k]
                if can_run.at(s.at, after=False):
                    others += firsts[k].get(job.priority, 0)
            # The statement that took its next chunk: what it took before it.
            known = [p for c in b.claims if c.job == job_id and (p := _place(c)) is not None]
            head = min(known) if known else None
            others += sum(
                1
                for c in b.claims
                if _counts(c, job, jobs) and (head is None or (p := _place(c)) is None or p < head)
            )
            n_jobs = bisect.bisect_left(created[job.priority], b.at) - bisect.bisect_right(
                finished[job.priority], a.at
            )
            alive = [
                life
                for life in lives
                if life.started_at < b.at and (life.ended_at is None or life.ended_at > a.at)
            ]
            slack = sum(life.batch for life in alive)
            if not job.limited:
                slack -= next((life.batch for life in alive if life.pid == b.daemon), 0)
            out.append(
                Wait(job_id, job.label, job.limited, a.at, b.at, others, n_jobs, len(alive), slack)
            )
    return out


def _counts(claim: Claim, job: Job, jobs: Mapping[int, Job]) -> bool:
    """A first claim of another job of the same priority as ``job``: a turn given away."""
    return claim.n == 1 and claim.job != job.id and jobs[claim.job].priority == job.priority


def worst(found: Sequence[Wait]) -> Wait | None:
    """The wait closest to its bound (or furthest beyond it)."""
    return max(found, key=lambda w: (w.others - w.bound, w.others), default=None)
