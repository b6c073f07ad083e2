"""The daemons registered in ``chunkd.workers``, for ``chunkd workers``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chunkd.db.sql_files import queries
from chunkd.ops.errors import database_errors

if TYPE_CHECKING:
    import asyncpg

__all__ = ["WorkerRow", "list_workers"]


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


async def list_workers(conn: asyncpg.Connection, *, stale_after_s: float) -> list[WorkerRow]:
    """Registered daemons; ages come from the database clock, so a skewed client cannot make a
    live worker look stale."""
    with database_errors(conn):
        rows = await conn.fetch(queries()["ops_workers"])
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
            live=float(r["heartbeat_age_s"]) <= stale_after_s,
        )
        for r in rows
    ]
