"""The daemons registered in ``chunkd.workers``, for ``chunkd workers``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chunkd.db.sql_files import queries
from chunkd.ops.errors import database_errors

if TYPE_CHECKING:
    import asyncpg

__all__ = ["LEGACY_STALE_AFTER_S", "WorkerRow", "list_workers"]

#: How long a silence makes a daemon stale when it does not say how often it heartbeats
#: (chunkd 0.2 daemons; seconds). Any other is stale after three of its heartbeats, when the
#: reaper takes it for dead.
LEGACY_STALE_AFTER_S = 120.0


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
    stale_after_s: float  # the silence that makes it stale (seconds)
    heartbeat_s: float | None = None  # how often it says it heartbeats (None: it does not say)

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
            "stale_after_s": self.stale_after_s,
            "state": "live" if self.live else "stale",
        }


async def list_workers(
    conn: asyncpg.Connection, *, stale_after_s: float | None = None
) -> list[WorkerRow]:
    """Registered daemons; ages come from the database clock, so a skewed client cannot make a
    live worker look stale. A daemon is stale once silent for ``stale_after_s`` seconds, or
    with None for three of its own heartbeats, as the reaper counts
    (:data:`LEGACY_STALE_AFTER_S` for a daemon that does not say how often it heartbeats)."""
    with database_errors(conn):
        rows = await conn.fetch(queries()["ops_workers"], stale_after_s, LEGACY_STALE_AFTER_S)
    return [
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
            live=float(r["heartbeat_age_s"]) <= r["stale_after_s"],
            stale_after_s=r["stale_after_s"],
            heartbeat_s=r["heartbeat_s"],
        )
        for r in rows
    ]
