"""This host's way to the database: a pooler in between (and its mode), LISTEN/NOTIFY, and the
difference between this host's clock and the database's.

A pooler answers with a process id of its own (its cancel key), not the server's; two client
connections that, one after the other, land on the same server process share server
connections: a transaction pooler (PgBouncer hands the most recently freed server connection
to the next transaction). In session mode each client keeps its own.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from chunkd.db.connection import backend_pid
from chunkd.db.listener import POOLER_POLL_INTERVAL_S
from chunkd.db.sql_files import queries
from chunkd.ops.doctor.context import Context, doctor_connection
from chunkd.ops.doctor.findings import Finding, Level
from chunkd.settings import pooler_mode

__all__ = ["CLOCK_WARN_S", "clock", "connection", "listen_notify"]

# chunkd itself follows the database's clock (leases, retries, schedules); a host whose clock
# is off still misleads whoever reads its logs beside chunk_events, or types --at times.
CLOCK_WARN_S = 1.0
_TIMEOUT_S = 5.0

_TRANSACTION_MODE = (
    f"chunkd run works but finds new work by polling every {POOLER_POLL_INTERVAL_S:g}s "
    "(no LISTEN); enqueue, status, retry, cancel, pause, limit, schedule, workers, web work; "
    "chunkd wait sees a job end only on its 5s re-read; chunkd migrate does not work (it "
    "needs a session)"
)


async def _shares_server_connections(ctx: Context) -> bool:
    other = await doctor_connection(ctx.dsn)
    try:
        first = await backend_pid(ctx.conn, _TIMEOUT_S)
        return await backend_pid(other, _TIMEOUT_S) == first
    finally:
        await other.close()


async def connection(ctx: Context) -> Finding:
    """Direct, through a session pooler, or through a transaction pooler (what then works and
    what does not), against what ``--pooler`` says."""
    who, said = ctx.who, pooler_mode(ctx.dsn)
    server = (
        f"role {who['role']} on database {who['database']}, PostgreSQL {who['server_version']}"
        + (", a standby (read-only)" if who["in_recovery"] else "")
    )
    behind = await backend_pid(ctx.conn, _TIMEOUT_S) != ctx.conn.get_server_pid()
    shares = behind and await _shares_server_connections(ctx)
    route = "transaction pooler" if shares else "pooler" if behind else "direct"
    details: dict[str, Any] = {"route": route, "pooler_option": said}
    level, advice = Level.OK, ""
    if route == "direct":
        message = f"connected directly as {server}: everything works, LISTEN included"
        if said == "transaction":
            level = Level.WARNING
            message = f"connected directly as {server}, but with --pooler transaction"
            advice = "drop --pooler transaction: it turns LISTEN off for nothing"
    elif route == "transaction pooler" and said == "session":
        level = Level.PROBLEM
        message = (
            f"--pooler session, but the pooler in front of {server} shares server "
            "connections between clients (transaction mode): LISTEN and prepared statements "
            "break there"
        )
        advice = "use --pooler transaction, or a pooler in session mode"
    elif route == "transaction pooler":
        level = Level.WARNING
        message = f"through a transaction pooler to {server}: {_TRANSACTION_MODE}"
        advice = "for NOTIFY wake-ups and migrate, connect directly or through a session pooler"
    elif said == "session":
        message = f"through a pooler in session mode to {server}: everything works"
    else:
        level = Level.WARNING
        message = (
            f"through a pooler to {server} that kept one server connection per client (session "
            f"mode?); with --pooler {said} chunkd works as through a transaction pooler: "
            f"{_TRANSACTION_MODE}"
        )
        advice = "if it pools sessions, say so: --pooler session (CHUNKD_POOLER=session)"
    return Finding("connection", level, message, advice, details=details)


async def listen_notify(ctx: Context) -> Finding:
    """A NOTIFY sent on this connection, received by a LISTEN on a second one: the daemons'
    wake-up path, timed. Not run through a transaction pooler, where chunkd does not LISTEN."""
    if getattr(ctx.conn, "transaction_pooler", False):
        return Finding(
            "listen-notify",
            Level.OK,
            "not checked: chunkd does not LISTEN through a transaction pooler",
            checked=False,
        )
    channel = f"chunkd_doctor_{secrets.token_hex(6)}"
    token = secrets.token_hex(8)
    got = asyncio.get_running_loop().create_future()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == token and not got.done():
            got.set_result(time.monotonic())

    listener = await doctor_connection(ctx.dsn)
    try:
        await listener.add_listener(channel, on_notify)
        sent = time.monotonic()
        await ctx.conn.execute(queries()["doctor_notify"], channel, token)
        timeout_s = ctx.options.notify_timeout_s
        try:
            arrived = await asyncio.wait_for(got, timeout_s)
        except TimeoutError:
            return Finding(
                "listen-notify",
                Level.PROBLEM,
                f"a NOTIFY did not arrive within {timeout_s:g}s on a second connection",
                "the daemons then find new work only by --poll-interval: look for a proxy or "
                "pooler that drops notifications, or a server with a full notification queue",
            )
    finally:
        await listener.close()
    ms = (arrived - sent) * 1000
    return Finding(
        "listen-notify",
        Level.OK,
        f"LISTEN/NOTIFY round trip {ms:.1f} ms",
        details={"round_trip_ms": round(ms, 2)},
    )


async def clock(ctx: Context) -> Finding:
    """This host's clock against the database's (``clock_timestamp()``), with the query's
    round trip as the uncertainty."""
    before = time.time()
    db_now = await ctx.conn.fetchval(queries()["doctor_clock"])
    after = time.time()
    offset_s = db_now.timestamp() - (before + after) / 2
    uncertainty_s = (after - before) / 2
    details = {"offset_s": round(offset_s, 4), "uncertainty_s": round(uncertainty_s, 4)}
    direction = "behind" if offset_s > 0 else "ahead of"
    message = (
        f"this host's clock is {abs(offset_s):.3f}s {direction} the database's "
        f"(±{uncertainty_s:.3f}s)"
    )
    if abs(offset_s) - uncertainty_s < CLOCK_WARN_S:
        return Finding("clock", Level.OK, message, details=details)
    return Finding(
        "clock",
        Level.WARNING,
        message,
        "chunkd follows the database's clock, but logs and --at times come from this host's: "
        "run NTP (chrony, systemd-timesyncd) here and on the database server",
        details=details,
    )
