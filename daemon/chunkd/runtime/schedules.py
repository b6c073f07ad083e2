"""Firing recurring schedules: every daemon runs this task; each due time fires once.

No leader: a daemon that finds a schedule due computes the next due time from its cron and
time zone (:mod:`chunkd.cron`) and calls ``chunkd.fire_schedule``, a compare-and-set of the
schedule's ``next_fire_at`` under its row lock plus a unique (schedule, due time) row, so
however many daemons race, one fires and the others find nothing to do. The next due time is
the first one after the clock, so a fleet that was down across several due times fires once
(a catch-up), not once per missed time. The clock is the database's (one clock for the whole
fleet); tests give a fake one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import structlog

from chunkd.cron import next_fire
from chunkd.db import DATABASE_ERRORS
from chunkd.db.schedules import DueSchedule, ScheduleStore
from chunkd.runtime.health import DatabaseHealth

__all__ = ["Scheduler", "file_clock"]

log = structlog.get_logger("chunkd.runtime.schedules")

Clock = Callable[[], Awaitable[datetime]]


class Scheduler:
    def __init__(
        self,
        store: ScheduleStore,
        *,
        worker_id: str,
        interval_s: float,
        clock: Clock | None = None,
        health: DatabaseHealth | None = None,
    ) -> None:
        self._store = store
        self._health = health
        self._worker_id = worker_id
        self.interval_s = interval_s
        # A fake clock cannot be waited for: poll at interval_s instead of sleeping to a due time.
        self._fake_clock = clock is not None
        self._clock: Clock = clock or store.clock
        # The due time of each schedule whose cron this daemon could not read when firing it:
        # said once per due time, not on every pass until another daemon (one that can read
        # it) fires it.
        self._unreadable: dict[int, datetime] = {}

    async def run_once(self) -> float:
        """Plans new schedules and fires the due ones; returns seconds to sleep."""
        now = await self._clock()
        for schedule in await self._store.due(now):
            if schedule.next_fire_at is None:
                await self._plan(schedule, now)
            else:
                await self._fire(schedule, schedule.next_fire_at, now)
        if self._fake_clock:
            return self.interval_s
        next_at = await self._store.next_at()
        if next_at is None:
            return self.interval_s
        return max(0.0, min(self.interval_s, (next_at - now).total_seconds()))

    async def run(self) -> None:
        while True:
            try:
                sleep_s = await self.run_once()
            except DATABASE_ERRORS as exc:
                # Waited out like every task's database error (a restart, a read-only
                # window): the due time is still due on the next pass, and fires once.
                if self._health is not None:
                    await self._health.failed("schedules", exc)
                else:
                    log.warning("schedules.failed", error=str(exc) or type(exc).__name__)
                sleep_s = self.interval_s
            await asyncio.sleep(sleep_s)

    async def _plan(self, schedule: DueSchedule, now: datetime) -> None:
        try:
            first = next_fire(schedule.cron, schedule.timezone, now)
        except ValueError as exc:
            if await self._store.plan(schedule.id, None, str(exc)):
                log.error("schedule.invalid", schedule=schedule.name, error=str(exc))
            return
        if await self._store.plan(schedule.id, first, None):
            log.info("schedule.planned", schedule=schedule.name, next_fire_at=first.isoformat())

    async def _fire(self, schedule: DueSchedule, due_at: datetime, now: datetime) -> None:
        try:
            next_at = next_fire(schedule.cron, schedule.timezone, max(now, due_at))
        except ValueError as exc:  # planned by a daemon that could read it (another cronsim)
            if self._unreadable.get(schedule.id) != due_at:
                self._unreadable[schedule.id] = due_at
                log.error("schedule.invalid", schedule=schedule.name, error=str(exc))
            return
        fired = await self._store.fire(schedule.id, due_at, next_at, self._worker_id)
        if fired is None:
            return  # another daemon fired it first
        outcome, job = fired
        log.info(
            f"schedule.{outcome}",
            schedule=schedule.name,
            due_at=due_at.isoformat(),
            sync_job_id=str(job) if job else None,
            next_fire_at=next_at.isoformat(),
            worker_id=self._worker_id,
        )


def file_clock(path: str) -> Clock:
    """A fake schedule clock for tests: the ISO 8601 instant written in the file ``path``
    (re-read on every tick, so a test moves time by rewriting it)."""

    async def now() -> datetime:
        when = datetime.fromisoformat(Path(path).read_text(encoding="utf-8").strip())  # noqa: ASYNC240
        if when.tzinfo is None:
            raise ValueError(f"schedule clock file {path} holds a time without an offset")
        return when

    return now
