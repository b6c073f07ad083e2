"""Everything that talks to PostgreSQL; the only package that imports asyncpg.

- :mod:`~chunkd.db.connection`: connections and pools, user-facing connect errors, the
  transient-error classification;
- :mod:`~chunkd.db.queue`: the daemon's queue API, one method per named statement;
- :mod:`~chunkd.db.listener`: the dedicated LISTEN connection;
- :mod:`~chunkd.db.sql_files`: the shipped SQL (migrations, named statements);
- :mod:`~chunkd.db.migrate`: applying and checking migrations.
"""

from chunkd.db.connection import (
    TRANSIENT_ERRORS,
    DatabaseError,
    connect,
    create_pool,
    retry_transient,
    validate_identifier,
)
from chunkd.db.listener import CHANNEL, Listener
from chunkd.db.queue import Claim, ClaimedRow, Queue

__all__ = [
    "CHANNEL",
    "TRANSIENT_ERRORS",
    "Claim",
    "ClaimedRow",
    "DatabaseError",
    "Listener",
    "Queue",
    "connect",
    "create_pool",
    "retry_transient",
    "validate_identifier",
]
