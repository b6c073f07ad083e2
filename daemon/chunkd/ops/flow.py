"""Flow control, for ``chunkd pause``, ``resume`` and ``limit``: pause and resume a job or a
kind, rate limits per kind, concurrency limits per key, and the list of what is in effect.

Every action is one call of a public SQL function (``pause_sync_job``, ``set_rate_limit``, …),
so a role granted only those functions can run these commands (docs/security.md). Actions wait
for their locks 50 ms at a time (at most 200 ms), for ``lock_wait_s`` in all, then say who
holds them (:func:`chunkd.ops.errors.run_locked`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.db.locks import DEFAULT_LOCK_WAIT_S, Wanted
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.errors import database_errors, rows_of, run_locked

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "FlowLimit",
    "JobFlow",
    "flow_limits",
    "format_rate",
    "parse_rate",
    "pause_job",
    "pause_kind",
    "resume_job",
    "resume_kind",
    "set_concurrency_limit",
    "set_rate_limit",
]

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$")
_PER_SECOND = {None: 1, "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_PER_SECOND |= {"h": 3600, "hour": 3600}
_NO_LIMIT = frozenset({"none", "off", "unlimited"})


def parse_rate(text: str) -> Decimal | None:
    """``20/s``, ``90/m``, ``3600/h``, ``0.5`` (per second) → chunks per second, exactly;
    ``none``/``off``/``unlimited`` → None (remove the limit).

    :raises ChunkdError: anything else, or a rate that is not positive.
    """
    if text.strip().lower() in _NO_LIMIT:
        return None
    match = _RATE.match(text.lower())
    if not match:
        raise ChunkdError(
            f"{text!r} is not a rate (examples: 20/s, 90/m, 3600/h, 0.5; or none to remove)"
        )
    try:
        per_second = Decimal(match[1]) / _PER_SECOND[match[2]]
    except InvalidOperation:
        raise ChunkdError(f"{text!r} is not a rate") from None
    if per_second <= 0:
        raise ChunkdError(f"a rate must be positive, got {text!r} (none removes the limit)")
    return per_second


def format_rate(per_second: Decimal | float | None) -> str:
    """Chunks per second as an operator writes it: ``20/s``; ``30/m`` or ``10/h`` below one
    per second when that is a round number."""
    if per_second is None:
        return "-"
    value = float(per_second)
    for unit, factor in (("s", 1), ("m", 60), ("h", 3600)):
        scaled = value * factor
        if scaled >= 1 and math.isclose(scaled, round(scaled, 3), rel_tol=1e-9):
            return f"{round(scaled, 3):g}/{unit}"
    return f"{value:g}/s"


# A pause takes SHARE on the ready queue (it waits for the claims under way); every action
# locks the rows it changes.
_PAUSE = Wanted("chunkd.ready", "ShareLock")


async def _count(
    conn: asyncpg.Connection,
    query: str,
    arg: Any,
    *,
    what: str,
    wanted: tuple[Wanted, ...],
    lock_wait_s: float,
) -> int:
    count: int = await run_locked(
        conn, queries()[query], arg, what=what, wanted=wanted, wait_s=lock_wait_s
    )
    return count


async def pause_job(
    conn: asyncpg.Connection, job_id: UUID, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Pauses a job; returns how many of its chunks are held back (pending now).

    Claims under way finish first; once this returns, no chunk of the job is claimed until it
    is resumed. Chunks in flight finish normally. The pause never holds the fleet's claims and
    enqueues up for more than one short try at a time (50 ms, at most 200 ms); it keeps trying
    for ``lock_wait_s`` seconds.

    :raises ChunkdError: no such job, or it is cancelled.
    :raises chunkd.db.locks.LockWaitError: the locks stayed taken for ``lock_wait_s``: one line
        naming the session that holds them; nothing was changed.
    """
    return await _count(
        conn,
        "ops_pause_sync_job",
        job_id,
        what=f"pause of job {job_id}",
        wanted=(_PAUSE, *rows_of("jobs")),
        lock_wait_s=lock_wait_s,
    )


async def resume_job(
    conn: asyncpg.Connection, job_id: UUID, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Resumes a job and wakes idle daemons; returns how many of its chunks are pending."""
    return await _count(
        conn,
        "ops_resume_sync_job",
        job_id,
        what=f"resume of job {job_id}",
        wanted=rows_of("jobs"),
        lock_wait_s=lock_wait_s,
    )


async def pause_kind(
    conn: asyncpg.Connection, kind: str, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Pauses every job of ``kind``, present and future; returns how many chunks are held
    (as :func:`pause_job`)."""
    return await _count(
        conn,
        "ops_pause_kind",
        kind,
        what=f"pause of kind {kind!r}",
        wanted=(_PAUSE, *rows_of("kind_flow")),
        lock_wait_s=lock_wait_s,
    )


async def resume_kind(
    conn: asyncpg.Connection, kind: str, *, lock_wait_s: float = DEFAULT_LOCK_WAIT_S
) -> int:
    """Resumes ``kind``; returns how many of its chunks are pending."""
    return await _count(
        conn,
        "ops_resume_kind",
        kind,
        what=f"resume of kind {kind!r}",
        wanted=rows_of("kind_flow"),
        lock_wait_s=lock_wait_s,
    )


async def set_rate_limit(
    conn: asyncpg.Connection,
    kind: str,
    per_second: Decimal | None,
    burst: int | None,
    *,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> None:
    """At most ``per_second`` claims per second of ``kind``'s chunks, fleet-wide, and at most
    ``burst`` at once (None: a third of a second's worth); ``per_second`` None removes the limit."""
    await run_locked(
        conn,
        queries()["ops_set_rate_limit"],
        kind,
        per_second,
        burst,
        what=f"rate limit of kind {kind!r}",
        wanted=rows_of("kind_flow"),
        wait_s=lock_wait_s,
    )


async def set_concurrency_limit(
    conn: asyncpg.Connection,
    key: str,
    max_concurrency: int | None,
    *,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> None:
    """At most ``max_concurrency`` chunks of all unfinished jobs with concurrency key ``key``
    processing at once, fleet-wide; None removes the limit."""
    await run_locked(
        conn,
        queries()["ops_set_concurrency_limit"],
        key,
        max_concurrency,
        what=f"concurrency limit of key {key!r}",
        wanted=rows_of("concurrency_limits"),
        wait_s=lock_wait_s,
    )


@dataclass(frozen=True)
class JobFlow:
    """The flow controls that apply to one job: its own (pause, rate, concurrency key), its
    key's limit and its kind's (pause, rate)."""

    paused_at: datetime | None = None
    max_per_second: Decimal | None = None
    job_burst: int | None = None
    concurrency_key: str | None = None
    key_max_concurrency: int | None = None
    kind_paused_at: datetime | None = None
    kind_per_second: Decimal | None = None
    kind_burst: int | None = None

    def lines(self, kind: str, when: Callable[[datetime], str] = datetime.isoformat) -> list[str]:
        """One line per control in effect, for ``chunkd status JOB``; ``when`` formats times."""
        lines = []
        if self.paused_at is not None:
            lines.append(f"job paused since {when(self.paused_at)}")
        if self.kind_paused_at is not None:
            lines.append(f"kind {kind!r} paused since {when(self.kind_paused_at)}")
        if self.max_per_second is not None:
            lines.append(f"job rate {format_rate(self.max_per_second)} (burst {self.job_burst})")
        if self.kind_per_second is not None:
            rate = format_rate(self.kind_per_second)
            lines.append(f"kind {kind!r} rate {rate} (burst {self.kind_burst})")
        if self.concurrency_key is not None:
            limit = self.key_max_concurrency
            lines.append(
                f"concurrency key {self.concurrency_key!r}: "
                + (f"at most {limit} at once" if limit is not None else "no limit set")
            )
        return lines

    def as_json(self) -> dict[str, Any]:
        def when(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        def number(value: Decimal | None) -> float | None:
            return float(value) if value is not None else None

        return {
            "paused_at": when(self.paused_at),
            "max_per_second": number(self.max_per_second),
            "job_burst": self.job_burst,
            "concurrency_key": self.concurrency_key,
            "key_max_concurrency": self.key_max_concurrency,
            "kind_paused_at": when(self.kind_paused_at),
            "kind_per_second": number(self.kind_per_second),
            "kind_burst": self.kind_burst,
        }


@dataclass(frozen=True)
class FlowLimit:
    """One row of ``chunkd.flow_limits()``: a paused or rate-limited kind, a concurrency key,
    or a paused job (``name`` is then its id)."""

    scope: str
    name: str
    paused_at: datetime | None
    per_second: Decimal | None
    burst: int | None
    tokens: float | None
    max_concurrency: int | None
    processing: int
    pending: int
    active_jobs: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": self.name,
            "paused_at": self.paused_at.isoformat() if self.paused_at else None,
            "per_second": float(self.per_second) if self.per_second is not None else None,
            "burst": self.burst,
            "tokens": round(self.tokens, 3) if self.tokens is not None else None,
            "max_concurrency": self.max_concurrency,
            "processing": self.processing,
            "pending": self.pending,
            "active_jobs": self.active_jobs,
        }


async def flow_limits(conn: asyncpg.Connection) -> list[FlowLimit]:
    """Paused and rate-limited kinds, concurrency keys (with a limit or unfinished jobs), and
    paused jobs; with their chunks processing and pending now."""
    with database_errors():
        rows = await conn.fetch(queries()["ops_flow_limits"])
    return [FlowLimit(**dict(r)) for r in rows]
