"""Option types and helpers shared by the ``chunkd`` commands: durations, job ids, the DSN
option, running a coroutine on one connection, the console."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from chunkd.dsn import to_uri
from chunkd.settings import POOLER_MODES, Dsn, parse_duration
from chunkd.times import RANGE, storable

if TYPE_CHECKING:
    import asyncpg
    from rich.console import Console

__all__ = [
    "DURATION",
    "INT32",
    "JOB_ID",
    "LINE",
    "TIMESTAMP",
    "Duration",
    "JobId",
    "Line",
    "Timestamp",
    "console",
    "dsn_option",
    "heartbeats_or_stale_after_option",
    "lock_wait_option",
    "plural",
    "run_async",
    "stale_after_option",
    "with_connection",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Duration(click.ParamType[float]):
    """Seconds as a number or with a unit: 30, 30s, 500ms, 5m, 2h, 7d."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class Timestamp(click.ParamType[datetime]):
    """A point in time: ISO 8601 with a time zone (``2026-12-01T08:00:00Z``, ``...+01:00``).

    A time without a zone is refused rather than guessed: the client's and the database's
    zones may differ, and an hour off is a job started an hour early.
    """

    name = "timestamp"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            when = datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(
                f"{value!r} is not a timestamp: give ISO 8601 with a time zone, "
                "e.g. 2026-12-01T08:00:00Z",
                param,
                ctx,
            )
        if when.tzinfo is None or when.utcoffset() is None:
            self.fail(
                f"{value!r} has no time zone: add Z (UTC) or an offset such as +01:00",
                param,
                ctx,
            )
        if not storable(when):
            self.fail(f"{value!r} is not a time chunkd stores: give one {RANGE}", param, ctx)
        return when


TIMESTAMP = Timestamp()


class Line(click.ParamType[str]):
    """A value that may contain spaces (``exec:`` commands): from the environment, a list of
    them is one per line, not split on whitespace as click does by default."""

    name = "text"
    envvar_list_splitter = "\n"


LINE = Line()


_POOLER_KEY = "chunkd.pooler"


def _remember_pooler(ctx: click.Context, _param: click.Parameter, value: str) -> None:
    ctx.meta[_POOLER_KEY] = value


NO_DSN = "no database given: pass --dsn, or set CHUNKD_DSN (or DATABASE_URL)"


def _dsn_with_pooler(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None or not value.strip():
        raise click.UsageError(NO_DSN, ctx)
    try:
        uri = to_uri(value)  # a libpq key=value DSN becomes the URI asyncpg takes
    except ValueError as exc:  # the message never quotes the DSN: it may hold a password
        raise click.BadParameter(str(exc), ctx, param) from None
    # --pooler is eager, so it has been read by now, wherever it stands on the command line.
    return Dsn(uri, ctx.meta.get(_POOLER_KEY, "auto"))


def dsn_option(func: F) -> F:
    """``--dsn`` and ``--pooler``: the command receives ``dsn`` as a :class:`Dsn` (always a
    ``postgresql://`` URI) carrying both. A missing DSN is one line naming ``--dsn``,
    ``CHUNKD_DSN`` and ``DATABASE_URL``."""
    func = click.option(
        "--dsn",
        envvar=["CHUNKD_DSN", "DATABASE_URL"],
        callback=_dsn_with_pooler,
        help="PostgreSQL connection URI (postgresql://user@host/db) or libpq key=value pairs "
        "(host=... dbname=...).  [env: CHUNKD_DSN, DATABASE_URL]",
    )(func)
    return click.option(
        "--pooler",
        type=click.Choice(POOLER_MODES),
        default="auto",
        show_default=True,
        envvar="CHUNKD_POOLER",
        is_eager=True,
        expose_value=False,
        callback=_remember_pooler,
        help="A connection pooler between chunkd and PostgreSQL: 'transaction' (PgBouncer's "
        "pool_mode = transaction, Supabase's port 6543) runs without prepared statements or "
        "LISTEN; 'session' for a direct connection or a session pooler; 'auto' detects a "
        "pooler and then assumes transaction mode.  [env: CHUNKD_POOLER]",
    )(func)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(coro)


INT32 = click.IntRange(min=-(2**31), max=2**31 - 1)
STALE_AFTER_DEFAULT = "2m"


def stale_after_option(meaning: str, *, own_heartbeats: bool = False) -> Callable[[F], F]:
    """``--stale-after DURATION`` (``CHUNKD_STALE_AFTER``, default 2m), the seconds without a
    heartbeat after which a worker counts as stale; ``meaning`` completes "A worker silent this
    long ..." for the command's help. ``own_heartbeats``: no default (None), the command
    judges each worker by three of its own heartbeats, as the reaper does."""
    if own_heartbeats:
        return click.option(
            "--stale-after",
            type=DURATION,
            default=None,
            envvar="CHUNKD_STALE_AFTER",
            help=f"A worker silent this long {meaning}.  [default: three of the worker's own "
            "heartbeats, as the reaper judges it]  [env: CHUNKD_STALE_AFTER]",
        )
    return click.option(
        "--stale-after",
        type=DURATION,
        default=STALE_AFTER_DEFAULT,
        show_default=True,
        envvar="CHUNKD_STALE_AFTER",
        help=f"A worker silent this long {meaning}.  [env: CHUNKD_STALE_AFTER]",
    )


def heartbeats_or_stale_after_option(meaning: str) -> Callable[[F], F]:
    """``--stale-after DURATION`` (``CHUNKD_STALE_AFTER``), given or None: a worker counts as
    stale once silent that long, or by default once it missed three of its own heartbeats (the
    reaper's rule; 2m for a daemon that does not say how often it heartbeats); ``meaning``
    completes "A worker silent this long ..." for the command's help."""
    return click.option(
        "--stale-after",
        type=DURATION,
        default=None,
        envvar="CHUNKD_STALE_AFTER",
        help=f"A worker silent this long {meaning}; by default one that missed three of its "
        "heartbeats, when the reaper takes it for dead.  [env: CHUNKD_STALE_AFTER]",
    )


LOCK_WAIT_MAX_S = 3600.0


def _lock_wait(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value > LOCK_WAIT_MAX_S:
        raise click.BadParameter(f"at most {LOCK_WAIT_MAX_S:g}s (an hour)", ctx, param)
    return value


def lock_wait_option(func: F) -> F:
    """``--lock-wait DURATION`` (``CHUNKD_LOCK_WAIT``, default 10s): how long an action keeps
    trying for locks other sessions hold (each try waits 50 ms, at most 200 ms, so the fleet's
    claims and enqueues never queue behind it for longer); the command receives
    ``lock_wait``."""
    return click.option(
        "--lock-wait",
        type=DURATION,
        default="10s",
        show_default=True,
        envvar="CHUNKD_LOCK_WAIT",
        callback=_lock_wait,
        help="How long to keep trying for locks other sessions hold, in short tries (50 ms, at "
        "most 200 ms: the fleet's claims never wait behind this for longer); then one line "
        "names the session in the way and nothing is changed.  [env: CHUNKD_LOCK_WAIT]",
    )(func)


class JobId(click.ParamType[uuid.UUID]):
    """A sync job id: a UUID, checked here so a typo is one clear line, not a server error."""

    name = "job"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> uuid.UUID:
        if isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a job id (a UUID, as printed by `chunkd enqueue`)")


JOB_ID = JobId()


def with_connection(dsn: str, work: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
    """Runs ``work(conn)`` on one connection that is always closed, also on Ctrl-C."""
    from chunkd.db import connect

    async def go() -> T:
        conn = await connect(dsn, application_name="chunkd-cli")
        try:
            return await work(conn)
        finally:
            await conn.close()

    return run_async(go())


def console() -> Console:
    """A rich console for stdout; piped output gets a wide line instead of wrapped cells."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if piped else None)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
