"""The dedicated LISTEN connection that wakes the claim loop (asyncpg's docs: never LISTEN on a
pooled connection, it loses its listeners when it goes back to the pool).

Through a transaction pooler LISTEN cannot work (the pooler hands the session that listens to
whoever comes next), so the listener says so once and wakes the claim loop on a short poll
instead (:data:`POOLER_POLL_INTERVAL_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from chunkd.db.connection import (
    TRANSIENT_ERRORS,
    connect,
    idle_session_timeout_s,
    validate_identifier,
)
from chunkd.db.sql_files import queries
from chunkd.errors import ConnectError
from chunkd.settings import pooler_mode

__all__ = ["CHANNEL", "POOLER_POLL_INTERVAL_S", "Listener"]

log = structlog.get_logger("chunkd.db")

# The channel the SQL trigger notifies; LISTEN cannot take a bound parameter, so it is checked.
CHANNEL = "chunkd"
# Through a transaction pooler: how often the claim loop looks for work instead of a NOTIFY.
POOLER_POLL_INTERVAL_S = 1.0
# The shortest ping interval, whatever idle timeout the server advertises.
MIN_PING_INTERVAL_S = 0.05


class Listener:
    """One dedicated LISTEN connection, reconnected with backoff for as long as it runs.

    Notifications sent while it is disconnected are lost, so ``on_connected`` runs after every
    (re)connect: the daemon polls at once. A periodic ping detects a connection that died
    silently (no FIN from a crashed host), and keeps the session from looking idle: it runs at
    least three times within the server's ``idle_session_timeout``.
    """

    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[str], None],
        on_connected: Callable[[], Awaitable[None]],
        *,
        channel: str = CHANNEL,
        ping_interval_s: float = 5.0,
        max_backoff_s: float = 5.0,
        pooler_poll_interval_s: float = POOLER_POLL_INTERVAL_S,
    ) -> None:
        self._dsn = dsn
        self._channel = validate_identifier(channel)
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._ping_interval_s = ping_interval_s
        self._max_backoff_s = max_backoff_s
        self._pooler_poll_interval_s = pooler_poll_interval_s
        self.connection: asyncpg.Connection | None = None
        self.listening = False  # True while LISTEN is in effect on a live connection
        self.polling = False  # True once LISTEN turned out to be unavailable

    def _callback(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # asyncpg passes the payload as a str (a no-op here); its stubs promise only object.
        self._on_notify(str(payload))

    async def run(self) -> None:
        if pooler_mode(self._dsn) == "transaction":
            await self._poll("--pooler transaction")
        backoff_s = 0.1
        while True:
            try:
                await self._serve_one_connection()
                backoff_s = 0.1
            except (ConnectError, *TRANSIENT_ERRORS) as exc:
                log.warning("listener.disconnected", error=str(exc), retry_in_s=backoff_s)
            if self.polling:
                await self._poll("a transaction pooler was detected")
            await asyncio.sleep(backoff_s)
            backoff_s = min(self._max_backoff_s, backoff_s * 2)

    async def _poll(self, reason: str) -> None:
        """Never returns: wakes the claim loop every poll interval, as a NOTIFY would."""
        self.polling = True
        log.warning(
            "listener.unavailable",
            reason=f"{reason}: LISTEN needs a session of its own",
            poll_interval_s=self._pooler_poll_interval_s,
            note="new work is found by polling; connect with --pooler session or directly "
            "for NOTIFY wake-ups",
        )
        await self._on_connected()
        while True:
            await asyncio.sleep(self._pooler_poll_interval_s)
            self._on_notify("")

    async def _serve_one_connection(self) -> None:
        conn = await connect(self._dsn, application_name="chunkd-listener")
        if getattr(conn, "transaction_pooler", False):
            await conn.close()
            self.polling = True
            return
        self.connection = conn
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            interval_s = await self._ping_interval(conn)
            await conn.add_listener(self._channel, self._callback)
            self.listening = True
            log.info("listener.connected", channel=self._channel, ping_interval_s=interval_s)
            await self._on_connected()
            while not lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lost.wait(), interval_s)
                if not lost.is_set():
                    await conn.fetchval(queries()["ping"], timeout=self._ping_interval_s)
            raise ConnectionResetError("listener connection closed")
        finally:
            self.listening = False
            self.connection = None
            conn.terminate()

    async def _ping_interval(self, conn: asyncpg.Connection) -> float:
        """The configured interval, or a third of the server's idle-session timeout if shorter
        (the server would otherwise end this quiet session, and notifications with it)."""
        idle_timeout_s = await idle_session_timeout_s(conn)
        if idle_timeout_s is None:
            return self._ping_interval_s
        return max(MIN_PING_INTERVAL_S, min(self._ping_interval_s, idle_timeout_s / 3))
