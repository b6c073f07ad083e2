"""Everything that talks to PostgreSQL; the only package that imports asyncpg.

- :mod:`~chunkd.db.connection`: connections and pools, user-facing connect errors, the
  transient-error classification;
- :mod:`~chunkd.db.queue`: the daemon's queue API, one method per named statement;
- :mod:`~chunkd.db.listener`: the dedicated LISTEN connection;
- :mod:`~chunkd.db.sql_files`: the shipped SQL (migrations, named statements);
- :mod:`~chunkd.db.migrate`: applying and checking migrations.

The names below are imported on first use (PEP 562), not by ``import chunkd.db``: the client
(:mod:`chunkd.client`) reads its statements from :mod:`~chunkd.db.sql_files` and must not pull
in asyncpg, structlog and the rest for an application that talks to PostgreSQL with psycopg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chunkd.db.codecs import UndecodableValueError
    from chunkd.db.connection import (
        DATABASE_ERRORS,
        TRANSIENT_ERRORS,
        DatabaseError,
        connect,
        connection_failure,
        create_pool,
        is_data_error,
        sqlstate,
        validate_identifier,
    )
    from chunkd.db.listener import CHANNEL, Listener
    from chunkd.db.queue import Claim, ClaimedRow, Queue, WorkerRegistration

__all__ = [
    "CHANNEL",
    "DATABASE_ERRORS",
    "TRANSIENT_ERRORS",
    "Claim",
    "ClaimedRow",
    "DatabaseError",
    "Listener",
    "Queue",
    "UndecodableValueError",
    "WorkerRegistration",
    "connect",
    "connection_failure",
    "create_pool",
    "is_data_error",
    "sqlstate",
    "validate_identifier",
]

_MODULE_OF = {
    "CHANNEL": "listener",
    "Listener": "listener",
    "Claim": "queue",
    "ClaimedRow": "queue",
    "Queue": "queue",
    "WorkerRegistration": "queue",
    "DATABASE_ERRORS": "connection",
    "TRANSIENT_ERRORS": "connection",
    "DatabaseError": "connection",
    "UndecodableValueError": "codecs",
    "connect": "connection",
    "connection_failure": "connection",
    "create_pool": "connection",
    "is_data_error": "connection",
    "sqlstate": "connection",
    "validate_identifier": "connection",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'chunkd.db' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chunkd.db.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
