"""How the daemon's tasks report database errors: one line per fault, not one per retry.

A lost connection or a restart is logged by the task that met it (``claim.failed``,
``heartbeat.failed``, …) and retried on a fresh connection. An error the server *reports* on a
write (read-only, disk full, a missing grant) is a state of the database that every task meets
at once and again on every retry: it is logged once, as ``database.unwritable`` with what it
means, and once more as ``database.writable`` when a write passes again. Meanwhile nothing is
dropped: outcomes stay queued, claims and renewals are tried again.
"""

from __future__ import annotations

import time

import structlog

from chunkd.db import TRANSIENT_ERRORS, Queue, sqlstate

__all__ = ["DatabaseHealth", "unwritable_reason"]

log = structlog.get_logger("chunkd.runtime.health")

# A write that passes within this long of a refusal does not end the fault yet: after a change
# of default_transaction_read_only, each server process takes the new value at its own pace,
# so writes pass and fail mixed for a moment.
SETTLE_S = 1.0

_REASONS = {
    "25006": "the database is read-only (a standby, or default_transaction_read_only = on)",
    "53100": "the database server's disk is full",
    "53200": "the database server is out of memory",
    "53300": "the database server has too many connections",
    "42501": "permission denied: the daemon's role is missing a grant",
}


def unwritable_reason(code: str | None) -> str:
    """What a SQLSTATE says about the database, in words."""
    if code in _REASONS:
        return _REASONS[code]
    if code is not None and code.startswith("53"):
        return "the database server is out of resources"
    return "the database refuses the daemon's statements"


def first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text.strip() else type(exc).__name__


class DatabaseHealth:
    def __init__(self, queue: Queue, *, worker_id: str) -> None:
        self._queue = queue
        self._worker_id = worker_id
        self._refusing: str | None = None  # the SQLSTATE of the refusal being waited out
        self._since = 0.0
        self._last_refusal = 0.0
        self._refusals = 0

    async def failed(self, task: str, exc: BaseException) -> None:
        """A statement of ``task`` failed with one of ``chunkd.db.DATABASE_ERRORS``."""
        if isinstance(exc, TRANSIENT_ERRORS):
            log.warning(f"{task}.failed", error=first_line(exc), worker_id=self._worker_id)
            return
        code = sqlstate(exc) or type(exc).__name__
        if code == "25006":
            # Read-only: maybe a standby after a failover. Statements from now on run on new
            # connections, which a multi-host DSN (target_session_attrs) points at the primary.
            await self._queue.expire_connections()
        self._refusals += 1
        self._last_refusal = time.monotonic()
        if code == self._refusing:
            return
        if self._refusing is None:
            self._since = self._last_refusal
        self._refusing = code
        log.error(
            "database.unwritable",
            reason=unwritable_reason(code),
            error=first_line(exc),
            sqlstate=code,
            task=task,
            worker_id=self._worker_id,
            note="nothing is dropped: outcomes stay queued, claims and renewals are retried",
        )

    def wrote(self) -> None:
        """A write passed: if the database was refusing writes, say it takes them again."""
        if self._refusing is None or time.monotonic() - self._last_refusal < SETTLE_S:
            return
        log.warning(
            "database.writable",
            after_s=round(time.monotonic() - self._since, 3),
            refused_statements=self._refusals,
            worker_id=self._worker_id,
        )
        self._refusing = None
        self._refusals = 0
