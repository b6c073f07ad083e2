"""The dedicated LISTEN connection that wakes the claim loop (asyncpg's docs: never LISTEN on a
pooled connection, it loses its listeners when it goes back to the pool)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from chunkd.db.connection import TRANSIENT_ERRORS, connect, validate_identifier
from chunkd.db.sql_files import queries
from chunkd.errors import ConnectError

__all__ = ["CHANNEL", "Listener"]

log = structlog.get_logger("chunkd.db")

# The channel the SQL trigger notifies; LISTEN cannot take a bound parameter, so it is checked.
CHANNEL = "chunkd"


class Listener:
    """One dedicated LISTEN connection, reconnected with backoff for as long as it runs.

    Notifications sent while it is disconnected are lost, so ``on_connected`` runs after every
    (re)connect: the daemon polls at once. A periodic ping detects a connection that died
    silently (no FIN from a crashed host).
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
    ) -> None:
        self._dsn = dsn
        self._channel = validate_identifier(channel)
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._ping_interval_s = ping_interval_s
        self._max_backoff_s = max_backoff_s
        self.connection: asyncpg.Connection | None = None

    def _callback(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # asyncpg passes the payload as a str (a no-op here); its stubs promise only object.
        self._on_notify(str(payload))

    async def run(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                await self._serve_one_connection()
                backoff_s = 0.1
            except (ConnectError, *TRANSIENT_ERRORS) as exc:
                log.warning("listener.disconnected", error=str(exc), retry_in_s=backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(self._max_backoff_s, backoff_s * 2)

    async def _serve_one_connection(self) -> None:
        conn = await connect(self._dsn, application_name="chunkd-listener")
        self.connection = conn
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(self._channel, self._callback)
            log.info("listener.connected", channel=self._channel)
            await self._on_connected()
            while not lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._ping_interval_s)
                if not lost.is_set():
                    await conn.fetchval(queries()["ping"], timeout=self._ping_interval_s)
            raise ConnectionResetError("listener connection closed")
        finally:
            self.connection = None
            conn.terminate()
