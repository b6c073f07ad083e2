"""Server errors as one readable line: an operator typing a command never sees a traceback; and
operator actions run with bounded lock waits (:func:`run_locked`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from chunkd.db import TRANSIENT_ERRORS, DatabaseError
from chunkd.db.locks import DEFAULT_LOCK_WAIT_S, Wanted, with_lock_retry
from chunkd.db.server_errors import describe_server_error
from chunkd.errors import ChunkdError, DatabaseUnavailableError

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["Wanted", "database_errors", "rows_of", "run_locked"]


@contextlib.contextmanager
def database_errors(
    conn: asyncpg.Connection | PoolConnectionProxy | None = None,
) -> Iterator[None]:
    """Turns a server error into one ChunkdError line (a DatabaseUnavailableError, exit code
    75, when the connection failed or the statement may pass if run again).

    Our SQL functions raise messages that start with ``chunkd: `` and are written for users;
    the prefix is dropped because the CLI prints ``chunkd: error: `` itself. A refusal names
    what is missing and the GRANT that fixes it (with the role of ``conn``, when given);
    anything else is shown by its first line only (a server error can carry a multi-line
    DETAIL/context).
    """
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        # Connection cut, server restarting, a conflict: an operator command just says so,
        # in one line (whether to run it again is the operator's call; exit code 75).
        message = (str(exc) or type(exc).__name__).splitlines()[0]
        raise DatabaseUnavailableError(f"database unavailable, try again: {message}") from None
    except DatabaseError as exc:
        role = None
        if conn is not None:
            # Reported by the server at connect (ParameterStatus): no query needed.
            role = getattr(conn.get_settings(), "session_authorization", None)
        raise ChunkdError(describe_server_error(exc, role=role)) from None


def rows_of(*tables: str) -> tuple[Wanted, ...]:
    """Row locks on these tables of schema chunkd (for naming who holds them)."""
    return tuple(Wanted(f"chunkd.{table}", "row") for table in tables)


async def run_locked(
    conn: asyncpg.Connection | PoolConnectionProxy,
    statement: str,
    *args: Any,
    what: str,
    wanted: Sequence[Wanted],
    wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> Any:
    """``fetchval(statement, *args)`` as one operator action: in a transaction of its own whose
    lock waits last at most 50 ms (200 ms while those in its way come and go), tried again
    until ``wait_s`` has passed (:func:`chunkd.db.locks.with_lock_retry`), so it never holds
    the fleet's claims and enqueues up for longer. Errors are one line
    (:func:`database_errors`); an action that could not get its locks says who holds them
    (``what`` names it: "pause of job ..."; ``wanted``: the locks it takes, to find their
    holders)."""
    with database_errors(conn):
        return await with_lock_retry(
            conn, lambda: conn.fetchval(statement, *args), what=what, wanted=wanted, wait_s=wait_s
        )
