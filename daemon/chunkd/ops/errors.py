"""Server errors as one readable line: an operator typing a command never sees a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from chunkd.db import TRANSIENT_ERRORS, DatabaseError
from chunkd.errors import ChunkdError

__all__ = ["database_errors"]

_SCHEMA_MISSING = {"3F000", "42P01", "42883"}  # invalid schema, undefined table / function


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turns a server error into one ChunkdError line.

    Our SQL functions raise messages that start with ``chunkd: `` and are written for users;
    the prefix is dropped because the CLI prints ``chunkd: error: `` itself. Anything else is
    shown by its first line only (a server error can carry a multi-line DETAIL/context).
    """
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        # Connection cut, server restarting, a conflict: an operator command just says so,
        # in one line (whether to run it again is the operator's call).
        message = (str(exc) or type(exc).__name__).splitlines()[0]
        raise ChunkdError(f"database unavailable, try again: {message}") from None
    except DatabaseError as exc:
        message = (str(exc) or type(exc).__name__).splitlines()[0]
        if message.startswith("chunkd: "):
            raise ChunkdError(message.removeprefix("chunkd: ")) from None
        if getattr(exc, "sqlstate", None) in _SCHEMA_MISSING:
            raise ChunkdError(
                f"the chunkd schema is missing or incomplete ({message}); run `chunkd migrate`"
            ) from None
        raise ChunkdError(f"database error: {message}") from None
