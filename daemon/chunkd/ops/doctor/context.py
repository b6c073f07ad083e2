"""What every check of ``chunkd doctor`` is given: the connection, the bounds, who is asking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chunkd.db import connect
from chunkd.ops.doctor.findings import Level

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Context", "DoctorOptions", "doctor_connection"]


async def doctor_connection(dsn: str) -> asyncpg.Connection:
    """A connection of the doctor's, routed as ``--pooler`` says but without named prepared
    statements: through a transaction pooler the doctor was told is a session pooler, a named
    statement would meet one of another client's on the server connection it lands on
    (``prepared statement "__asyncpg_stmt_1__" already exists``) before the connection check
    could say so. Raises :class:`~chunkd.errors.ConnectError`."""
    return await connect(dsn, application_name="chunkd-doctor", prepared_statements=False)


@dataclass(frozen=True)
class DoctorOptions:
    """``warn_age_s`` and ``problem_age_s``: a transaction, snapshot or idle-in-transaction
    session older than these is a warning, a problem (``--warn-age``, ``--problem-age``);
    ``stale_after_s``: a worker silent this long is dead (``--stale-after``; None: three of
    the heartbeats each worker's row says it sends, as the reaper judges it);
    ``notify_timeout_s``: how long the LISTEN/NOTIFY round trip may take."""

    warn_age_s: float = 60.0
    problem_age_s: float = 900.0
    stale_after_s: float | None = None
    notify_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.problem_age_s < self.warn_age_s:
            raise ValueError("--problem-age must not be below --warn-age")

    def age_level(self, age_s: float | None) -> Level:
        """OK, WARNING or PROBLEM for something that has been open ``age_s`` seconds."""
        if age_s is None or age_s <= self.warn_age_s:
            return Level.OK
        return Level.PROBLEM if age_s > self.problem_age_s else Level.WARNING


@dataclass(frozen=True)
class Context:
    """``conn``: the doctor's connection (read-only transactions only); ``dsn``: to open a
    second one (the LISTEN round trip, the pooler's mode); ``who``: the ``doctor_role`` row
    (role, database, server, superuser, owner, read_all_stats, hidden_sessions)."""

    conn: asyncpg.Connection
    dsn: str
    options: DoctorOptions
    who: asyncpg.Record

    @property
    def role(self) -> str:
        return str(self.who["role"])

    def hidden_note(self) -> str:
        """What this role cannot see of other roles' sessions, or ``""``."""
        hidden = int(self.who["hidden_sessions"])
        if not hidden:
            return ""
        return (
            f"{hidden} session(s) of other roles hide their state and start from role {self.role}"
        )
