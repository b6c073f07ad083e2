"""Recurring schedules from the operator's side: add (or replace), list, remove, pause, resume.

The daemons fire them (:mod:`chunkd.runtime.schedules`); these are the public SQL functions,
so an edge function calling ``create_schedule`` gets the same checks. The cron expression is
also read here with the daemons' parser, so a typo is one clear line now rather than an error
recorded by the first daemon that plans the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chunkd.chunk import dumps_json
from chunkd.cron import next_fire
from chunkd.db.locks import DEFAULT_LOCK_WAIT_S
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.errors import database_errors, rows_of, run_locked

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "ScheduleRow",
    "add_schedule",
    "list_schedules",
    "pause_schedule",
    "remove_schedule",
    "resume_schedule",
]


@dataclass(frozen=True)
class ScheduleRow:
    """One schedule as ``chunkd schedule list`` shows it."""

    name: str
    cron: str
    timezone: str
    kind: str
    dedupe: bool
    paused_at: datetime | None
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    last_job_id: str | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "name": self.name,
            "cron": self.cron,
            "timezone": self.timezone,
            "kind": self.kind,
            "dedupe": self.dedupe,
            "paused_at": iso(self.paused_at),
            "next_fire_at": iso(self.next_fire_at),
            "last_fired_at": iso(self.last_fired_at),
            "last_job_id": self.last_job_id,
            "last_error": self.last_error,
        }


async def add_schedule(
    conn: asyncpg.Connection,
    *,
    name: str,
    cron: str,
    kind: str,
    chunks: list[Any],
    payload: Any,
    timezone: str,
    dedupe: bool,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> str:
    """Creates the schedule, or replaces the one named ``name``: 'created' or 'updated'."""
    try:
        next_fire(cron, timezone, datetime.now(UTC))
    except ValueError as exc:
        raise ChunkdError(str(exc)) from None
    outcome: str = await run_locked(
        conn,
        queries()["ops_create_schedule"],
        name,
        cron,
        kind,
        dumps_json(chunks, ensure_ascii=False),
        dumps_json(payload, ensure_ascii=False),
        timezone,
        dedupe,
        max_concurrency,
        max_attempts,
        priority,
        what=f"schedule {name!r}",
        wanted=rows_of("schedules"),
        wait_s=lock_wait_s,
    )
    return outcome


async def list_schedules(conn: asyncpg.Connection) -> list[ScheduleRow]:
    with database_errors(conn):
        rows = await conn.fetch(queries()["ops_schedules"])
    return [
        ScheduleRow(
            name=r["name"],
            cron=r["cron"],
            timezone=r["timezone"],
            kind=r["kind"],
            dedupe=r["dedupe"],
            paused_at=r["paused_at"],
            next_fire_at=r["next_fire_at"],
            last_fired_at=r["last_fired_at"],
            last_job_id=str(r["last_job_id"]) if r["last_job_id"] else None,
            last_error=r["last_error"],
        )
        for r in rows
    ]


async def _by_name(conn: asyncpg.Connection, query: str, name: str, lock_wait_s: float) -> None:
    await run_locked(
        conn,
        queries()[query],
        name,
        what=f"schedule {name!r}",
        wanted=rows_of("schedules"),
        wait_s=lock_wait_s,
    )


async def remove_schedule(
    conn: asyncpg.Connection, name: str, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> None:
    """Deletes the schedule (jobs it created stay). ChunkdError if there is none."""
    await _by_name(conn, "ops_drop_schedule", name, lock_wait_s)


async def pause_schedule(
    conn: asyncpg.Connection, name: str, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> None:
    await _by_name(conn, "ops_pause_schedule", name, lock_wait_s)


async def resume_schedule(
    conn: asyncpg.Connection, name: str, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> None:
    """Resumes from now: due times missed while paused do not fire."""
    await _by_name(conn, "ops_resume_schedule", name, lock_wait_s)
