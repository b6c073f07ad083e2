"""Retention policies, for ``chunkd retention``: how long finished jobs are kept, per terminal
state, read and set through ``chunkd.retention_policies()`` and ``chunkd.set_retention()``
(docs/storage.md, "Retention and history")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from chunkd.db.locks import DEFAULT_LOCK_WAIT_S
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.errors import database_errors, rows_of, run_locked

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "MAX_RETENTION_S",
    "RETENTION_STATES",
    "Policy",
    "format_keep",
    "retention_policies",
    "set_retention",
]

#: The states a policy is set for; a job that finished with a failed chunk (partial_failure) is
#: kept as 'failed'.
RETENTION_STATES = ("completed", "failed", "cancelled")
#: The longest policy (seconds): 36,500 days (chunkd.retention's check).
MAX_RETENTION_S = 36500 * 86400.0

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_keep(seconds: float) -> str:
    """Seconds as the CLI takes durations: ``3d``, ``36h``, ``90m``, ``45s`` (the largest unit
    that divides them; fractions of a second as ``1.5s``)."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Policy:
    """How long finished jobs of ``state`` are kept after they finished (``keep_s`` seconds),
    and when that was last set (database clock)."""

    state: str
    keep_s: float
    changed_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "keep_s": self.keep_s,
            "keep": format_keep(self.keep_s),
            "changed_at": self.changed_at.isoformat(),
        }


async def retention_policies(conn: asyncpg.Connection) -> list[Policy]:
    """The three policies: completed, failed, cancelled."""
    with database_errors(conn):
        rows = await conn.fetch(queries()["ops_retention_policies"])
    return [Policy(r["state"], float(r["keep_s"]), r["changed_at"]) for r in rows]


async def set_retention(
    conn: asyncpg.Connection,
    state: str,
    keep_s: float,
    *,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> None:
    """Finished jobs of ``state`` are kept ``keep_s`` seconds after they finished (jobs that
    finish from now on; those in the history keep the expiry they got).

    :raises ChunkdError: an unknown state or a duration under 1 second (one line).
    """
    if state == "partial_failure":  # the overall_status of a job kept as `failed`
        state = "failed"
    if state not in RETENTION_STATES:
        raise ChunkdError(
            f"no retention state {state!r}: {', '.join(RETENTION_STATES[:-1])} or "
            f"{RETENTION_STATES[-1]}"
        )
    await run_locked(
        conn,
        queries()["ops_set_retention"],
        state,
        timedelta(seconds=keep_s),
        what=f"retention of {state} jobs",
        wanted=rows_of("retention"),
        wait_s=lock_wait_s,
    )
