"""Connections to PostgreSQL: single connections and pools, with errors made user-facing.

Connection errors are translated into :class:`ConnectError` with the password removed, so
nothing above this package ever prints a DSN as given. Also the classification of errors:
:data:`TRANSIENT_ERRORS` (the same statement may simply be retried, on a fresh connection),
:func:`is_data_error` (this value can never be stored: retrying it cannot help) and
:data:`DATABASE_ERRORS` (everything the database or the connection to it can raise, which a
daemon task waits out instead of crashing).
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
    "DATABASE_ERRORS",
    "TRANSIENT_ERRORS",
    "DatabaseError",
    "connect",
    "create_pool",
    "is_data_error",
    "retry_transient",
    "sqlstate",
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
    # statement_timeout (57014) and lock_timeout (55P03): the same statement may pass later.
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.LockNotAvailableError,
    # A connection cut mid-statement (pg_terminate_backend, a restart) can leave asyncpg's
    # protocol in a state it reports this way (MagicStack/asyncpg#784, #1069); the pool
    # discards that connection, so the next try runs on a fresh one.
    asyncpg.exceptions.InternalClientError,
)

# Everything the database, or the connection to it, can raise on a statement: the transient
# errors above and any error the server reports (read-only, disk full, a missing grant, ...).
# A daemon task catches these, logs them in one line and tries again later; none is a reason
# for it to crash. Final for the same reason as TRANSIENT_ERRORS.
DATABASE_ERRORS: Final = (asyncpg.PostgresError, *TRANSIENT_ERRORS)

# SQLSTATE class 22: data exceptions (an invalid or out-of-range value, text the database
# encoding cannot hold, \u0000 in jsonb). The only server errors that say "this value".
_DATA_EXCEPTION_CLASS = "22"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error (e.g. ``'25006'``), or None for any other exception."""
    code = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    return code if isinstance(code, str) else None


def is_data_error(exc: BaseException) -> bool:
    """True when the values of a statement can never be stored, so retrying cannot help.

    That is SQLSTATE class 22 (data exceptions) from the server, or a value the driver refuses
    to send (asyncpg's client-side ``DataError``, text that cannot be encoded). Every other
    server error is a condition of the database (read-only, disk full, a lock or statement
    timeout, a serialization failure, too many connections, a missing grant): the same
    statement can succeed later, and fencing makes a late retry harmless.
    """
    code = sqlstate(exc)
    if code is not None:
        return code.startswith(_DATA_EXCEPTION_CLASS)
    return isinstance(exc, asyncpg.exceptions._base.DataError | UnicodeError)


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
