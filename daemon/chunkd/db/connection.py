"""Connections to PostgreSQL: single connections and pools, with errors made user-facing.

Connection errors are translated into :class:`ConnectError` with the password removed, so
nothing above this package ever prints a DSN as given. Every connection pins ``search_path``
(:data:`SEARCH_PATH`) and finds out whether it goes through a transaction pooler (``--pooler``,
:func:`chunkd.settings.pooler_mode`). Also the classification of errors:
:data:`TRANSIENT_ERRORS` (the same statement may simply be retried, on a fresh connection),
:func:`is_data_error` (this value can never be stored: retrying it cannot help) and
:data:`DATABASE_ERRORS` (everything the database or the connection to it can raise, which a
daemon task waits out instead of crashing).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import asyncpg
import structlog

from chunkd.db.codecs import set_jsonb_codec
from chunkd.db.sql_files import queries
from chunkd.dsn import to_uri
from chunkd.errors import ConnectError, DatabaseUnavailableError, ServerNotReadyError
from chunkd.redact import redact_dsn, scrub_password
from chunkd.settings import pooler_mode

__all__ = [
    "DATABASE_ERRORS",
    "SEARCH_PATH",
    "TRANSIENT_ERRORS",
    "Connection",
    "DatabaseError",
    "backend_pid",
    "connect",
    "connection_failure",
    "create_pool",
    "idle_session_timeout_s",
    "is_data_error",
    "sqlstate",
    "validate_identifier",
]

log = structlog.get_logger("chunkd.db")

# Errors reported by the server (constraint, syntax, raised by our functions): re-exported so
# no module outside chunkd.db imports asyncpg.
DatabaseError = asyncpg.PostgresError


# Every chunkd connection resolves names in pg_catalog first and never in a schema another role
# can create objects in (pg_temp last: it is never searched for functions or operators).
SEARCH_PATH = "pg_catalog, pg_temp"

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


class Connection(asyncpg.Connection):
    """An asyncpg connection that knows how it reaches the server.

    ``transaction_pooler``: through a pooler that hands each transaction to any server
    connection, so no named prepared statements (asyncpg's statement cache is off), no LISTEN,
    and no session state may be relied on.
    """

    transaction_pooler = False


@dataclass(frozen=True)
class _Route:
    transaction_pooler: bool
    # search_path as a startup parameter (direct connections), or by SET after connecting (a
    # session pooler that refuses the parameter), or not at all (a transaction pooler: a SET
    # would change the server connection of whoever gets it next).
    pin: Literal["startup", "set", "none"]

    def server_settings(self, application_name: str) -> dict[str, str]:
        settings = {"application_name": application_name}
        if self.pin == "startup":
            settings["search_path"] = SEARCH_PATH
        return settings

    def connect_kwargs(
        self, application_name: str, *, prepared_statements: bool = True
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "server_settings": self.server_settings(application_name),
            "connection_class": Connection,
        }
        if self.transaction_pooler or not prepared_statements:
            # Unnamed statements only: asyncpg then parses each statement again in the same
            # round trip as its execution, so no server connection keeps anything of ours.
            kwargs["statement_cache_size"] = 0
        return kwargs


_DIRECT = _Route(transaction_pooler=False, pin="startup")
_SESSION_POOLER = _Route(transaction_pooler=False, pin="set")
_TRANSACTION_POOLER = _Route(transaction_pooler=True, pin="none")


async def _init_connection(conn: asyncpg.Connection, route: _Route) -> None:
    if isinstance(conn, Connection):
        conn.transaction_pooler = route.transaction_pooler
    if route.pin == "set":
        await conn.execute(queries()["pin_search_path_session"])
    # jsonb in: already-serialised text (the worker serialises results itself so a bad value
    # fails that chunk alone); jsonb out: decoded Python values (claims read payloads as text).
    await set_jsonb_codec(conn)


def _refused_startup_parameter(exc: BaseException) -> bool:
    # PgBouncer: "unsupported startup parameter: search_path" (08P01, at connect).
    return isinstance(exc, asyncpg.PostgresError) and "startup parameter" in str(exc)


async def backend_pid(conn: asyncpg.Connection, timeout_s: float) -> int:
    """The server process id a statement on ``conn`` runs on, through the simple query
    protocol; through a pooler it differs from ``conn.get_server_pid()`` (the pooler's own)."""
    # COPY goes through the simple query protocol: no prepared statement (named or not) is
    # left on a server connection that a transaction pooler may hand to someone else.
    out = bytearray()

    async def sink(data: bytes) -> None:
        out.extend(data)

    await conn.copy_from_query(queries()["backend_pid"], output=sink, timeout=timeout_s)
    return int(out.decode().strip())


async def _open(dsn: str, timeout_s: float, kwargs: dict[str, Any]) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(to_uri(dsn), timeout=timeout_s, **kwargs)
    except _CONNECT_ERRORS as exc:
        if _refused_startup_parameter(exc):
            raise
        raise _connect_failed(dsn, exc) from None
    return conn


# SQLSTATEs of a connection that failed or ended but may work again: class 08 (connection
# exception), 53 (insufficient resources: too many connections, out of memory or disk), and a
# backend terminated, crashed or not accepting connections yet. Anything else the server says
# at connect (class 28: a wrong password or role; 3D000: no such database) needs the
# settings changed.
_UNAVAILABLE_CLASSES = ("08", "53")
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03"}


def connection_failure(exc: BaseException) -> str | None:
    """The first line of ``exc`` when it means the database could not be reached or the
    connection failed or was cut (worth trying again later: the CLI exits 75), else None.

    That is a socket error (``ConnectionError``, ``TimeoutError``, a missing unix socket), a
    server error of class 08 or 53 or a terminated backend (57P01-57P03), or asyncpg's own
    errors about its side of the connection (``InterfaceError``, ``InternalClientError``).
    The line never holds a DSN: none of these messages quotes one.
    """
    code = sqlstate(exc) or ""
    failed = (
        isinstance(exc, ConnectionError | TimeoutError | FileNotFoundError)
        or code.startswith(_UNAVAILABLE_CLASSES)
        or code in _UNAVAILABLE_STATES
        or isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError)
    )
    if not failed:
        return None
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _connect_failed(dsn: str, exc: BaseException) -> ConnectError:
    """The user-facing error for a failed connect: :class:`ServerNotReadyError` (starting up),
    :class:`DatabaseUnavailableError` (unreachable, or a refusal that may pass: exit 75) or
    :class:`ConnectError` (a refusal that needs the settings changed, a malformed DSN: exit 2)."""
    message = f"cannot connect to {redact_dsn(dsn)}: {_describe(exc, dsn)}"
    if isinstance(exc, asyncpg.exceptions.CannotConnectNowError):
        return ServerNotReadyError(message)
    # asyncpg's InterfaceError at connect is about the DSN or TLS settings: not a failure
    # that passes by itself.
    if isinstance(exc, OSError) or (
        connection_failure(exc) is not None and not isinstance(exc, asyncpg.InterfaceError)
    ):
        return DatabaseUnavailableError(message)
    return ConnectError(message)


async def _route_and_connect(
    dsn: str, timeout_s: float, application_name: str, prepared_statements: bool = True
) -> tuple[asyncpg.Connection, _Route]:
    """Connects as ``--pooler`` says (``auto``: finds out) and returns the route it took."""
    mode = pooler_mode(dsn)

    async def _open_as(route: _Route) -> asyncpg.Connection:
        options = route.connect_kwargs(application_name, prepared_statements=prepared_statements)
        return await _open(dsn, timeout_s, options)

    if mode == "transaction":
        return await _open_as(_TRANSACTION_POOLER), _TRANSACTION_POOLER
    try:
        conn = await _open_as(_DIRECT)
    except asyncpg.PostgresError as exc:
        # A pooler that refuses search_path as a startup parameter: a session pooler if the
        # user says so, otherwise assume transaction pooling (it works in either mode).
        route = _SESSION_POOLER if mode == "session" else _TRANSACTION_POOLER
        log.debug("db.startup_parameter_refused", error=str(exc), route=route.pin)
        return await _open_as(route), route
    if mode == "session":
        return conn, _DIRECT
    # auto: a pooler announces a backend pid of its own (its cancel key), not the server's.
    try:
        behind_pooler = await backend_pid(conn, timeout_s) != conn.get_server_pid()
    except asyncpg.PostgresError as exc:
        # Something between us and the server refused even that: play safe.
        log.debug("db.pooler_probe_failed", error=str(exc))
        behind_pooler = True
    except BaseException:
        conn.terminate()
        raise
    if not behind_pooler:
        return conn, _DIRECT
    await conn.close()
    return await _open_as(_TRANSACTION_POOLER), _TRANSACTION_POOLER


async def connect(
    dsn: str,
    *,
    timeout_s: float = 10.0,
    application_name: str = "chunkd",
    prepared_statements: bool = True,
) -> asyncpg.Connection:
    """A single connection (migrations, LISTEN, CLI commands), with errors made user-facing.

    ``dsn``: a ``postgresql://`` URI or libpq key=value pairs (:func:`chunkd.dsn.to_uri`); it
    may be a :class:`chunkd.settings.Dsn` carrying ``--pooler``; with ``auto`` (and for
    a plain string) a connection pooler is detected. Built-ins resolve in ``pg_catalog`` first:
    ``search_path`` is pinned to ``pg_catalog, pg_temp`` except through a transaction pooler.
    The returned :class:`Connection` says whether it goes through a transaction pooler.
    ``prepared_statements=False``: no named prepared statement on any route (asyncpg's
    statement cache off), for a connection that must work whatever ``--pooler`` says and
    whatever the pooler in between really does (``chunkd doctor``, which finds that out).
    Raises :class:`~chunkd.errors.ConnectError` (never with the password).
    """
    try:
        conn, route = await _route_and_connect(
            dsn, timeout_s, application_name, prepared_statements
        )
    except TRANSIENT_ERRORS as exc:
        raise _went_away(dsn, exc) from None
    try:
        await _init_connection(conn, route)
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, TRANSIENT_ERRORS):
            raise _went_away(dsn, exc) from None
        raise
    return conn


def _went_away(dsn: str, exc: BaseException) -> ServerNotReadyError:
    # Connected, then cut while setting the connection up (a restart, a terminated backend):
    # worth waiting for, like a server that is starting up.
    return ServerNotReadyError(
        f"cannot connect to {redact_dsn(dsn)}: the connection was lost while it was set up "
        f"({_describe(exc, dsn)})"
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release. chunkd keeps no session state on pooled connections (no
    LISTEN: the listener has a connection of its own; no advisory lock, SET, cursor or temporary
    table), so there is nothing to undo. asyncpg's default reset (``pg_advisory_unlock_all()``,
    ``CLOSE ALL``, ``UNLISTEN *``, ``RESET ALL``) would cost a round trip on every release, that
    is on every claim and every completion, before the caller gets its rows; through a
    transaction pooler it would also run on whichever server connection the pooler picks. The
    search_path pin, set at connect, stays. An open transaction is still rolled back: asyncpg
    does that before calling this."""


async def create_pool(dsn: str, *, size: int, timeout_s: float = 10.0) -> asyncpg.Pool:
    """The daemon's pool of up to ``size`` connections, routed like :func:`connect`; raises
    :class:`~chunkd.errors.ConnectError`."""
    try:
        probe, route = await _route_and_connect(dsn, timeout_s, "chunkd")
        try:
            idle_timeout_s = await idle_session_timeout_s(probe)
        finally:
            probe.terminate()
    except TRANSIENT_ERRORS as exc:
        raise _went_away(dsn, exc) from None
    # Idle connections are closed before the server's idle_session_timeout would cut them.
    lifetime_s = 300.0 if idle_timeout_s is None else min(300.0, idle_timeout_s / 2)

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn, route)

    try:
        pool = await asyncpg.create_pool(
            to_uri(dsn),
            min_size=1,
            max_size=size,
            init=init,
            reset=_keep_session,
            timeout=timeout_s,
            # Reconnected connections re-prepare lazily; a restart of Postgres invalidates them.
            max_inactive_connection_lifetime=lifetime_s,
            **route.connect_kwargs("chunkd"),
        )
    except _CONNECT_ERRORS as exc:
        raise _connect_failed(dsn, exc) from None
    assert pool is not None
    return pool


async def idle_session_timeout_s(conn: asyncpg.Connection) -> float | None:
    """The server's ``idle_session_timeout`` for this session in seconds (None: none)."""
    try:
        ms: int | None = await conn.fetchval(queries()["idle_session_timeout"])
    except asyncpg.PostgresError:
        return None
    return ms / 1000 if ms else None
