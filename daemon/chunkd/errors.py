"""User-facing errors: the CLI prints their message as one line and exits with the error's
``exit_code``: 2 (the command line, the settings or the installation must change) unless the
class says 75 (``EX_TEMPFAIL``: a condition of the database or the network that may pass, so a
service manager should try again)."""

from __future__ import annotations

__all__ = [
    "EXIT_CONFIG",
    "EXIT_TEMPFAIL",
    "ChunkdError",
    "ConnectError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "InvalidInputError",
    "JobNotFoundError",
    "SchemaVersionError",
    "ServerNotReadyError",
]

# The CLI's exit codes for errors: a configuration error (never worth restarting as it is),
# and sysexits.h's EX_TEMPFAIL, a temporary failure (worth trying again later).
EXIT_CONFIG = 2
EXIT_TEMPFAIL = 75


class ChunkdError(Exception):
    """A mistake or condition the user can fix; its message is complete and safe to print.

    ``exit_code``: what the CLI exits with: :data:`EXIT_CONFIG` (2), a configuration error
    (the unit files' ``RestartPreventExitStatus=2`` stop instead of restarting), or
    :data:`EXIT_TEMPFAIL` (75) for the subclasses that may pass by themselves.
    """

    exit_code = EXIT_CONFIG


class ConnectError(ChunkdError):
    """The database refused the connection (a wrong password, role or database name) or the
    DSN is malformed; the message never holds the password. Exit code 2."""


class DatabaseUnavailableError(ConnectError):
    """The database cannot be reached now (connection refused, no route, a timeout, a socket
    that does not exist yet, too many connections): it may come up, so the CLI exits with 75
    and a service manager restarts the command."""

    exit_code = EXIT_TEMPFAIL


class ServerNotReadyError(DatabaseUnavailableError):
    """The server answered but is starting up or shutting down: worth waiting for (exit 75)."""


class ConnectionLostError(ChunkdError, ConnectionError):
    """The connection to the database was lost during a client call (its backend terminated,
    a server restart or failover, the network): whether the call took effect is unknown.

    Retry the call on a new connection (a pool hands out one): a ``create_sync_job`` with a
    ``dedupe_key`` then returns the job the lost call created, if it did, instead of creating a
    second one. Inside the caller's own transaction, retry the whole transaction. A
    ``ConnectionError`` (so an ``OSError``) too, as generic retry logic expects; the driver's
    exception is its ``__cause__``. Exit code 75.
    """

    exit_code = EXIT_TEMPFAIL


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
