"""The only module that talks to asyncpg: connections, the queue API, and the LISTEN connection.

Each method of :class:`Queue` runs one named statement from ``sql/queries.sql``. Connection
errors are translated into :class:`ConnectError` with the password removed, so nothing above
this module ever prints a DSN as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import structlog

from chunkd.errors import ConnectError, ServerNotReadyError
from chunkd.sql_files import queries

__all__ = [
    "CHANNEL",
    "TRANSIENT_ERRORS",
    "ClaimedRow",
    "DatabaseError",
    "Listener",
    "Queue",
    "connect",
    "create_pool",
    "redact_dsn",
    "retry_transient",
    "validate_identifier",
]

log = structlog.get_logger("chunkd.db")

# Errors reported by the server (constraint, syntax, raised by our functions): re-exported so
# no module but this one imports asyncpg.
DatabaseError = asyncpg.PostgresError
T = TypeVar("T")

# The channel the SQL trigger notifies; LISTEN cannot take a bound parameter, so it is checked.
CHANNEL = "chunkd"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Errors after which retrying the same statement on a fresh connection can succeed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.QueryCanceledError,
    # A connection cut mid-statement (pg_terminate_backend, a restart) can leave asyncpg's
    # protocol in a state it reports this way (MagicStack/asyncpg#784, #1069); the pool
    # discards that connection, so the next try runs on a fresh one.
    asyncpg.exceptions.InternalClientError,
)


# What a failed connect can raise: refused/unreachable, timeouts, auth or missing database
# (server errors), and malformed DSNs (asyncpg's ClientConfigurationError is a ValueError).
_CONNECT_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ValueError,
)


def validate_identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid SQL identifier {name!r}")
    return name


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.scheme and parts.netloc and "@" in parts.netloc:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostinfo}" if ":" in userinfo else parts.netloc)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    redacted = urlunsplit(parts._replace(query=query))
    if not parts.scheme:  # key=value form: password=... anywhere
        redacted = re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    return redacted


def _describe(exc: BaseException, dsn: str) -> str:
    text = str(exc) or type(exc).__name__
    # asyncpg messages can echo parts of the DSN; never let a password through.
    with contextlib.suppress(ValueError):
        password = urlsplit(dsn).password
        if password:
            text = text.replace(password, "***")
    return text.splitlines()[0]


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in: already-serialised text (the worker serialises results itself so a bad value
    # fails that chunk alone); jsonb out: decoded Python values.
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=lambda text: text, decoder=json.loads
    )


async def connect(
    dsn: str, *, timeout_s: float = 10.0, application_name: str = "chunkd"
) -> asyncpg.Connection:
    """A single connection (migrations, LISTEN, CLI commands), with errors made user-facing."""
    try:
        conn = await asyncpg.connect(
            dsn, timeout=timeout_s, server_settings={"application_name": application_name}
        )
    except _CONNECT_ERRORS as exc:
        message = f"cannot connect to {redact_dsn(dsn)}: {_describe(exc, dsn)}"
        if isinstance(exc, asyncpg.exceptions.CannotConnectNowError):
            raise ServerNotReadyError(message) from None
        raise ConnectError(message) from None
    await _init_connection(conn)
    return conn


async def create_pool(dsn: str, *, size: int, timeout_s: float = 10.0) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            init=_init_connection,
            timeout=timeout_s,
            server_settings={"application_name": "chunkd"},
            # Reconnected connections re-prepare lazily; a restart of Postgres invalidates them.
            max_inactive_connection_lifetime=300,
        )
    except _CONNECT_ERRORS as exc:
        raise ConnectError(f"cannot connect to {redact_dsn(dsn)}: {_describe(exc, dsn)}") from None
    assert pool is not None
    return pool


async def retry_transient(
    what: str, make_call: Callable[[], Awaitable[T]], *, max_backoff_s: float = 2.0
) -> T:
    """Runs ``await make_call()`` until it succeeds; transient errors wait and try again."""
    backoff_s = 0.05
    while True:
        try:
            return await make_call()
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "db.retrying",
                operation=what,
                error=str(exc) or type(exc).__name__,
                retry_in_s=backoff_s,
            )
            await asyncio.sleep(backoff_s)
            backoff_s = min(max_backoff_s, backoff_s * 2)


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    queue_id: UUID
    chunk_id: UUID
    sync_job_id: UUID
    seq: int
    attempt: int
    kind: str
    payload: Any
    job_payload: Any
    lease_expires_at: datetime


def _interval_s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


class Queue:
    """The queue API the daemon uses: one method per named query, all values bound."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._q = queries()

    async def claim(
        self, worker_id: str, batch_size: int, kinds: Sequence[str] | None, lease_s: float
    ) -> list[ClaimedRow]:
        rows = await self._pool.fetch(
            self._q["claim_chunks"],
            worker_id,
            batch_size,
            list(kinds) if kinds is not None else None,
            _interval_s(lease_s),
        )
        return [ClaimedRow(*row) for row in rows]

    async def complete(
        self,
        worker_id: str,
        queue_ids: Sequence[UUID],
        attempts: Sequence[int],
        results_json: Sequence[str | None],
    ) -> set[UUID]:
        """Returns the ids whose completion was accepted; the rest were fenced out."""
        rows = await self._pool.fetch(
            self._q["complete_chunks"],
            worker_id,
            list(queue_ids),
            list(attempts),
            list(results_json),
        )
        return {row[0] for row in rows}

    async def fail(
        self,
        queue_id: UUID,
        worker_id: str,
        attempt: int,
        error: str,
        *,
        retryable: bool,
        retry_in_s: float | None,
        backoff_base_s: float,
        backoff_cap_s: float,
    ) -> str | None:
        """Returns the new status ('pending' or 'failed'), or None when fenced out."""
        return await self._pool.fetchval(
            self._q["fail_chunk"],
            queue_id,
            worker_id,
            attempt,
            error,
            retryable,
            _interval_s(retry_in_s) if retry_in_s is not None else None,
            _interval_s(backoff_base_s),
            _interval_s(backoff_cap_s),
        )

    async def heartbeat(self, worker_id: str, queue_ids: Sequence[UUID], lease_s: float) -> int:
        return await self._pool.fetchval(
            self._q["heartbeat_chunks"], worker_id, list(queue_ids), _interval_s(lease_s)
        )

    async def release(self, worker_id: str, queue_ids: Sequence[UUID]) -> int:
        return await self._pool.fetchval(self._q["release_chunks"], worker_id, list(queue_ids))

    async def cleanup_stuck_chunks(self) -> int:
        return await self._pool.fetchval(self._q["cleanup_stuck_chunks"])

    async def register_worker(
        self,
        worker_id: str,
        host: str,
        pid: int,
        version: str,
        kinds: Sequence[str],
        concurrency: int,
    ) -> None:
        await self._pool.execute(
            self._q["register_worker"], worker_id, host, pid, version, list(kinds), concurrency
        )

    async def worker_heartbeat(self, worker_id: str) -> None:
        await self._pool.execute(self._q["worker_heartbeat"], worker_id)

    async def deregister_worker(self, worker_id: str) -> None:
        await self._pool.execute(self._q["deregister_worker"], worker_id)

    async def queue_depth(self) -> dict[str, int]:
        rows = await self._pool.fetch(self._q["queue_depth"])
        return {row["status"]: row["chunks"] for row in rows}

    async def next_due_in(self, kinds: Sequence[str] | None) -> float | None:
        return await self._pool.fetchval(
            self._q["next_due_in"], list(kinds) if kinds is not None else None
        )


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

    def _callback(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._on_notify(payload)

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
