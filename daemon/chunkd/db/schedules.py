"""The schedule statements the daemon runs: one method per named query of ``sql/queries.sql``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from chunkd.db.sql_files import queries

__all__ = ["DueSchedule", "ScheduleStore"]


@dataclass(frozen=True, slots=True)
class DueSchedule:
    """A schedule to plan (``next_fire_at`` None) or to fire (due at ``next_fire_at``)."""

    id: int
    name: str
    cron: str
    timezone: str
    next_fire_at: datetime | None


class ScheduleStore:
    """Planning and firing schedules; every value bound."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._q = queries()

    async def clock(self) -> datetime:
        """The database's clock: every daemon of the fleet reads the same one."""
        now: datetime = await self._pool.fetchval(self._q["schedule_clock"])
        return now

    async def due(self, at: datetime, max_rows: int = 100) -> list[DueSchedule]:
        """Schedules not yet planned, or due at ``at``, earliest first."""
        rows = await self._pool.fetch(self._q["schedules_due"], at, max_rows)
        return [DueSchedule(*row) for row in rows]

    async def next_at(self) -> datetime | None:
        """The earliest planned due time of an active schedule."""
        when: datetime | None = await self._pool.fetchval(self._q["next_schedule_at"])
        return when

    async def plan(self, schedule_id: int, next_at: datetime | None, error: str | None) -> bool:
        """Sets a schedule's first due time (or records ``error``); False if another daemon
        planned it first."""
        planned: bool = await self._pool.fetchval(
            self._q["plan_schedule"], schedule_id, next_at, error
        )
        return planned

    async def fire(
        self, schedule_id: int, due_at: datetime, next_at: datetime, worker_id: str
    ) -> tuple[str, UUID | None] | None:
        """Fires the due time ``due_at`` and plans ``next_at``: ('fired' or 'deduped', the job),
        or None when another daemon fired it (or the schedule changed meanwhile)."""
        row = await self._pool.fetchrow(
            self._q["fire_schedule"], schedule_id, due_at, next_at, worker_id
        )
        if row is None:
            return None
        return row["outcome"], row["sync_job_id"]
