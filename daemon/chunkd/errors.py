"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations

__all__ = [
    "ChunkdError",
    "ConnectError",
    "InvalidInputError",
    "JobNotFoundError",
    "SchemaVersionError",
    "ServerNotReadyError",
]


class ChunkdError(Exception):
    """A mistake or condition the user can fix; its message is complete and safe to print."""


class ConnectError(ChunkdError):
    """The database cannot be reached with the given DSN (the message never holds the password)."""


class ServerNotReadyError(ConnectError):
    """The server answered but is starting up or shutting down: worth waiting for."""


class SchemaVersionError(ChunkdError):
    """The database schema is behind or ahead of what this chunkd knows."""


class InvalidInputError(ChunkdError, ValueError):
    """A value chunkd refuses: chunks that are not a non-empty list, an empty dedupe key, a
    ``run_at`` without a time zone, a retry of a cancelled job, a limit passed, ...

    The message is the server's (without its ``chunkd: `` prefix) or the client's own check,
    and names the value and what is wrong with it.
    """


class JobNotFoundError(ChunkdError, LookupError):
    """No sync job has the given id."""
