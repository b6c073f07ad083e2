"""Connections to PostgreSQL: single connections and pools, with errors made user-facing.

Connection errors are translated into :class:`ConnectError` with the password removed, so
nothing above this package ever prints a DSN as given. Also the classification of errors
after which a statement may simply be retried (:data:`TRANSIENT_ERRORS`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import asyncpg
import structlog

from chunkd.errors import ConnectError, ServerNotReadyError
from chunkd.redact import redact_dsn, scrub_password

__all__ = [
    "TRANSIENT_ERRORS",
    "DatabaseError",
    "connect",
    "create_pool",
    "retry_transient",
    "validate_identifier",
]

log = structlog.get_logger("chunkd.db")

# Errors reported by the server (constraint, syntax, raised by our functions): re-exported so
# no module outside chunkd.db imports asyncpg.
DatabaseError = asyncpg.PostgresError
T = TypeVar("T")

# Identifiers that cannot be bound parameters (the LISTEN channel) are checked against this.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Errors after which retrying the same statement on a fresh connection can succeed. Final, so its
# type is this fixed-length tuple: mypy checks `except (X, *TRANSIENT_ERRORS)` only for those.
TRANSIENT_ERRORS: Final = (
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


def _describe(exc: BaseException, dsn: str) -> str:
    text = str(exc) or type(exc).__name__
    return scrub_password(text, dsn).splitlines()[0]


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
