"""Operator actions and ``chunkd migrate`` beside a running fleet: lock waits kept short, tried
again, and one line naming the session in the way when they cannot proceed.

A lock that claims and enqueues conflict with (SHARE on ``chunkd.ready``, a trigger's SHARE ROW
EXCLUSIVE, a migration's ACCESS EXCLUSIVE) must never be waited for in its lock queue: every
claim and enqueue of the fleet would queue behind the waiter. :func:`with_lock_retry` runs one
unit of work (an action, a migration step) in a transaction of its own whose lock waits last at
most :data:`LOCK_TRY_MS`; a try that times out is rolled back and run again after a backoff,
until the caller's deadline has passed. A try may wait longer (doubling, up to
:data:`LOCK_TRY_MAX_MS`) only while the sessions in its way come and go: a busy fleet whose
claims each hold their lock for longer than 50 ms would otherwise never let it in, while one
stuck session (idle in a transaction) keeps every try at 50 ms. Then :func:`find_blockers` (the
named query
``lock_blockers``: ``pg_locks`` and ``pg_stat_activity``) says who holds what, and
:class:`LockWaitError` is one line: the pid, its role and application, its state and for how
long, its transaction's age and the lock it holds; or, when no transaction stayed in the way
for a second, how many short ones of which sessions came and went in it (seen between tries).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "DEFAULT_LOCK_WAIT_S",
    "LOCK_TRY_MAX_MS",
    "LOCK_TRY_MS",
    "Blocker",
    "LockWaitError",
    "Wanted",
    "find_blockers",
    "with_lock_retry",
]

T = TypeVar("T")

#: How long one try waits for a lock (its transaction's lock_timeout): claims and enqueues that
#: queue behind a waiting try wait at most this long.
LOCK_TRY_MS = 50
#: The longest a try waits, when every session that was in the way of the last one has ended
#: since (the fleet moves on: those queued behind the try wait for the claims under way).
LOCK_TRY_MAX_MS = 200
#: How long an action keeps trying by default (``--lock-wait``).
DEFAULT_LOCK_WAIT_S = 10.0
_BACKOFF_FIRST_S = 0.05
_BACKOFF_CAP_S = 0.5

_RETRIED = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.DeadlockDetectedError)


@dataclass(frozen=True)
class Wanted:
    """A lock a unit of work takes: ``relation`` as ``chunkd.ready`` (``chunkd.*``: every
    relation of the schema), ``mode`` as pg_locks spells it (``ShareLock``) or ``row``: rows of
    it."""

    relation: str
    mode: str


@dataclass(frozen=True)
class Blocker:
    """A session in the way: what ``pg_stat_activity`` shows of it to this role (``state``,
    ``state_s`` and ``xact_s``, in seconds, are None when it hides them), the lock it holds
    (``granted``) or waits for ahead of us (on the relation wanted first), its transaction
    (virtual id), and ``locks``: every lock of it in the way, that one first
    (``RowExclusiveLock on chunkd.ready``)."""

    pid: int
    role: str | None
    application_name: str | None
    state: str | None
    state_s: float | None
    xact_s: float | None
    mode: str
    relation: str
    granted: bool
    transaction: str
    locks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "locks", tuple(self.locks or ()))

    def describe(self, viewer: str | None = None) -> str:
        """``pid 4242 (role app, application 'billing', idle in transaction for 12.3 s,
        transaction open 12.4 s) holds RowExclusiveLock on chunkd.ready``."""
        about = [f"role {self.role}"] if self.role else []
        if self.application_name:
            about.append(f"application {self.application_name!r}")
        if self.state is None:
            who = f"role {viewer}" if viewer else "this role"
            about.append(f"its state is hidden from {who}: grant it pg_read_all_stats to see it")
        else:
            about.append(
                self.state + (f" for {self.state_s:.1f} s" if self.state_s is not None else "")
            )
            if self.xact_s is not None:
                about.append(f"transaction open {self.xact_s:.1f} s")
        verb = "holds" if self.granted else "waits for"
        locks = list(self.locks) or [f"{self.mode} on {self.relation}"]
        shown = ", ".join(locks[:4]) + (f" and {len(locks) - 4} more" if len(locks) > 4 else "")
        return f"pid {self.pid} ({', '.join(about)}) {verb} {shown}"


class LockWaitError(ChunkdError):
    """A unit of work did not get its locks within its deadline; nothing of it was applied.
    ``blockers``: who held them when it gave up (oldest transaction first)."""

    def __init__(self, message: str, blockers: Sequence[Blocker]):
        super().__init__(message)
        self.blockers = tuple(blockers)


async def find_blockers(
    conn: asyncpg.Connection | PoolConnectionProxy,
    wanted: Sequence[Wanted],
    *,
    min_age_s: float = 0.0,
) -> list[Blocker]:
    """The sessions that hold (or wait ahead for) a lock conflicting with ``wanted``, whose
    transaction is at least ``min_age_s`` old; held locks first, oldest transaction first."""
    rows = await conn.fetch(
        queries()["lock_blockers"],
        [w.relation for w in wanted],
        [w.mode for w in wanted],
        min_age_s,
    )
    return [Blocker(**dict(r)) for r in rows]


def blocked_message(
    what: str,
    wait_s: float,
    blockers: Sequence[Blocker],
    viewer: str | None = None,
    *,
    passing: Sequence[Blocker] = (),
    min_age_s: float = 1.0,
) -> str:
    """One line: ``what`` could not get its locks within ``wait_s``, and who holds them:
    ``blockers``, the sessions whose transaction in its way is ``min_age_s`` old or more; when
    there are none, ``passing``: those seen in its way between its tries, whose transactions
    came and went (a busy fleet, or claims waiting for the step while it waited for them)."""
    head = f"{what} waited {wait_s:g} s for locks other sessions hold; nothing was changed"
    if blockers:
        first = blockers[0]
        more = f" (and {len(blockers) - 1} more session(s))" if len(blockers) > 1 else ""
        return (
            f"{head}: {first.describe(viewer)}{more}; end that transaction (or SELECT "
            f"pg_terminate_backend({first.pid})) and run it again"
        )
    if not passing:
        return (
            f"{head}: the transactions in its way ended before they could be named, and none "
            "holds them now: run it again"
        )
    transactions = len({b.transaction for b in passing})
    pids = sorted({b.pid for b in passing})
    shown = ", ".join(map(str, pids[:5])) + (", ..." if len(pids) > 5 else "")
    return (
        f"{head}: {transactions} short transaction{'s' if transactions > 1 else ''} of "
        f"{len(pids)} session{'s' if len(pids) > 1 else ''} (pid {shown}) held them in turn, "
        f"none for {min_age_s:g} s or more, and no try (of at most {LOCK_TRY_MAX_MS} ms) found "
        "them free; run it again when they are fewer, or with a longer lock wait"
    )


async def with_lock_retry(
    conn: asyncpg.Connection | PoolConnectionProxy,
    work: Callable[[], Awaitable[T]],
    *,
    what: str,
    wanted: Sequence[Wanted],
    wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> T:
    """Runs ``work()`` in a transaction of its own whose lock waits last at most 50 ms; a try
    that times out (or deadlocks) is rolled back and run again after a backoff (50 ms doubling
    to 500 ms, jittered) until ``wait_s`` seconds have passed. The next try waits twice as long
    (at most 200 ms) when every session that was in the way (of ``wanted``) before the backoff
    has ended after it, and 50 ms again when one is still there.

    :raises LockWaitError: the deadline passed: one line naming the session in the way
        (``what`` says what gave up: "pause of job ...").
    """
    started = time.monotonic()
    tries = 0
    try_ms = LOCK_TRY_MS
    passing: dict[str, Blocker] = {}  # transaction -> its session, seen in the way
    while True:
        left_s = max(0.0, wait_s - (time.monotonic() - started))
        try:
            async with conn.transaction():
                await conn.execute(queries()["lock_try"], f"{try_ms}ms", f"{left_s:.3f}")
                return await work()
        except _RETRIED:
            tries += 1
            left_s = wait_s - (time.monotonic() - started)
            if left_s <= 0:
                break
            before = {b.transaction: b for b in await find_blockers(conn, wanted)}
            delay_s = min(_BACKOFF_CAP_S, _BACKOFF_FIRST_S * 2 ** (tries - 1))
            await asyncio.sleep(min(left_s, delay_s * random.uniform(0.5, 1.0)))
            after = {b.transaction: b for b in await find_blockers(conn, wanted)}
            passing.update(before)
            passing.update(after)
            stuck = before.keys() & after.keys()
            try_ms = LOCK_TRY_MS if stuck else min(LOCK_TRY_MAX_MS, 2 * try_ms)
    min_age_s = min(1.0, wait_s / 2)
    blockers = await find_blockers(conn, wanted, min_age_s=min_age_s)
    viewer = getattr(conn.get_settings(), "session_authorization", None)
    message = blocked_message(
        what, wait_s, blockers, viewer, passing=list(passing.values()), min_age_s=min_age_s
    )
    raise LockWaitError(message, blockers)
