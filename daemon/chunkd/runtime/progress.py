"""The periodic progress lines: per job, what this process did since the last ones.

Per-chunk *success* lines (``chunk.claimed``, ``chunk.completed``) are opt-in, at debug: one
process completes over 10,000 chunks a second (``docs/benchmarks.md``), and journald drops a
service's lines beyond its default rate limit, ``RateLimitBurst=10000`` messages per
``RateLimitIntervalSec=30s`` (journald.conf(5)). Failures, retries, fences and reaps stay one
line per chunk: they are what an operator reads a log for, and they are rare when things go well.

Instead, every ``--progress-interval`` (15 s by default) this process logs one ``job.progress``
line per job it worked on (completed, failed, retried, snoozed in the interval, completions per
second, chunks in flight now), at most :data:`MAX_JOB_LINES` of them (the busiest), then one
``progress`` line with the totals. An idle process logs nothing. At the defaults that is at most
42 lines per 30 s, whatever the throughput.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from uuid import UUID

import structlog

from chunkd.db import ClaimedRow
from chunkd.runtime.inflight import InFlight

__all__ = ["MAX_JOB_LINES", "JobTally", "Progress"]

log = structlog.get_logger("chunkd.runtime.progress")

# The busiest jobs get a line each per interval; the others are only counted in the totals.
MAX_JOB_LINES = 20


@dataclass(slots=True)
class JobTally:
    """One job's outcomes written by this process since the last progress lines."""

    kind: str
    completed: int = 0
    failed: int = 0
    retried: int = 0
    snoozed: int = 0


class Progress:
    """Counts outcomes per job (one dict lookup per chunk) and logs them every interval."""

    def __init__(self, inflight: InFlight, *, worker_id: str, interval_s: float) -> None:
        self._inflight = inflight
        self._worker_id = worker_id
        self.interval_s = interval_s
        self._jobs: dict[UUID, JobTally] = {}
        self._since: float | None = None  # loop time the current interval began (None: not run)

    def tally(self, row: ClaimedRow) -> JobTally:
        """The tally of ``row``'s job, for the caller to count an outcome in."""
        tally = self._jobs.get(row.sync_job_id)
        if tally is None:
            tally = self._jobs[row.sync_job_id] = JobTally(row.kind)
        return tally

    def log_once(self, elapsed_s: float) -> None:
        """Logs the lines for the last ``elapsed_s`` seconds and starts a new interval."""
        jobs, self._jobs = self._jobs, {}
        in_flight: Counter[UUID] = Counter()
        kinds: dict[UUID, str] = {}
        for row in self._inflight.held_rows():
            in_flight[row.sync_job_id] += 1
            kinds[row.sync_job_id] = row.kind
        for job_id, kind in kinds.items():
            if job_id not in jobs:
                jobs[job_id] = JobTally(kind)
        if not jobs:
            return
        busiest = sorted(
            jobs.items(), key=lambda item: item[1].completed + item[1].failed, reverse=True
        )
        for job_id, tally in busiest[:MAX_JOB_LINES]:
            log.info(
                "job.progress",
                sync_job_id=str(job_id),
                kind=tally.kind,
                completed=tally.completed,
                failed=tally.failed,
                retried=tally.retried,
                snoozed=tally.snoozed,
                per_second=round(tally.completed / elapsed_s, 1),
                in_flight=in_flight[job_id],
                interval_s=round(elapsed_s, 3),
                worker_id=self._worker_id,
            )
        completed = sum(t.completed for t in jobs.values())
        log.info(
            "progress",
            jobs=len(jobs),
            jobs_omitted=max(0, len(jobs) - MAX_JOB_LINES),
            completed=completed,
            failed=sum(t.failed for t in jobs.values()),
            retried=sum(t.retried for t in jobs.values()),
            snoozed=sum(t.snoozed for t in jobs.values()),
            per_second=round(completed / elapsed_s, 1),
            in_flight=sum(in_flight.values()),
            interval_s=round(elapsed_s, 3),
            worker_id=self._worker_id,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            self.flush()

    def flush(self) -> None:
        """Logs the interval so far (also at a stop, so its last outcomes are summed up)."""
        now = asyncio.get_running_loop().time()
        if self._since is not None:
            self.log_once(max(now - self._since, 1e-3))
        self._since = now
