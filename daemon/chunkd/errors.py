"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations

__all__ = ["ChunkdError", "ConnectError", "SchemaVersionError"]


class ChunkdError(Exception):
    """A mistake or condition the user can fix; its message is complete and safe to print."""


class ConnectError(ChunkdError):
    """The database cannot be reached with the given DSN (the message never holds the password)."""


class SchemaVersionError(ChunkdError):
    """The database schema is behind or ahead of what this chunkd knows."""
