"""The daemons registered in ``chunkd.workers``, for ``chunkd workers``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chunkd.db.sql_files import queries
from chunkd.ops.errors import database_errors

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MISSED_HEARTBEATS", "UNSAID_HEARTBEAT_STALE_AFTER_S", "WorkerRow", "list_workers"]

#: A worker that missed this many of its heartbeats is dead: the reaper's rule
#: (sql/functions/reaper.sql, chunkd.runtime.heartbeat.REGISTRY_MISSES).
MISSED_HEARTBEATS = 3
#: The bound for a worker whose row does not say how often it heartbeats (chunkd 0.2).
UNSAID_HEARTBEAT_STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    version: str
    kinds: list[str]
    concurrency: int
    started_at: datetime
    last_heartbeat_at: datetime
    heartbeat_age_s: float
    live: bool
    #: how often it says it heartbeats (seconds; None: it does not say), and the silence
    #: after which it counts as stale (seconds)
    heartbeat_s: float | None = None
    stale_after_s: float = UNSAID_HEARTBEAT_STALE_AFTER_S

    def as_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "kinds": self.kinds,
            "concurrency": self.concurrency,
            "started_at": self.started_at.isoformat(),
            "last_heartbeat_at": self.last_heartbeat_at.isoformat(),
            "heartbeat_age_s": round(self.heartbeat_age_s, 1),
            "state": "live" if self.live else "stale",
        }


def _stale_after_s(heartbeat_s: float | None, given: float | None) -> float:
    if given is not None:
        return given
    if heartbeat_s is None:
        return UNSAID_HEARTBEAT_STALE_AFTER_S
    return MISSED_HEARTBEATS * heartbeat_s


async def list_workers(conn: asyncpg.Connection, *, stale_after_s: float | None) -> list[WorkerRow]:
    """Registered daemons, each live or stale: silent for longer than ``stale_after_s``
    seconds, or, when it is None, than three of the heartbeats its row says it sends (as the
    reaper judges it; :data:`UNSAID_HEARTBEAT_STALE_AFTER_S` for a row that does not say).
    Ages come from the database clock, so a skewed client cannot make a live worker look
    stale."""
    with database_errors(conn):
        rows = await conn.fetch(queries()["ops_workers"])
    found = []
    for r in rows:
        heartbeat_s = None if r["heartbeat_s"] is None else float(r["heartbeat_s"])
        bound_s = _stale_after_s(heartbeat_s, stale_after_s)
        found.append(
            WorkerRow(
                worker_id=r["worker_id"],
                host=r["host"],
                pid=r["pid"],
                version=r["version"],
                kinds=list(r["kinds"]),
                concurrency=r["concurrency"],
                started_at=r["started_at"],
                last_heartbeat_at=r["last_heartbeat_at"],
                heartbeat_age_s=float(r["heartbeat_age_s"]),
                live=float(r["heartbeat_age_s"]) <= bound_s,
                heartbeat_s=heartbeat_s,
                stale_after_s=bound_s,
            )
        )
    return found
