"""Server errors as one readable line: an operator typing a command never sees a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from chunkd.db import TRANSIENT_ERRORS, DatabaseError
from chunkd.db.server_errors import describe_server_error
from chunkd.errors import ChunkdError, DatabaseUnavailableError

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["database_errors"]


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
