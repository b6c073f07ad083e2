"""Applying the ordered SQL migrations, and checking the schema before the daemon starts.

Each migration runs in its own transaction, with ``search_path`` pinned to ``pg_catalog``; all
of them run under one session advisory lock, so two ``chunkd migrate`` at once are safe: the
second waits, then finds nothing to do. Before anything is written, :func:`apply_migrations`
checks what would make it fail half-way or run someone else's code: a read-only database, a
``chunkd`` schema (or an object in it) owned by another role, no right to create the schema,
a transaction pooler. :func:`check_schema` does the same for ``chunkd run``: the schema's
version, and every privilege the daemon's statements need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from chunkd.db.connection import DatabaseError
from chunkd.db.server_errors import quote_role, read_only_message
from chunkd.db.sql_files import migrations, queries
from chunkd.errors import ChunkdError, SchemaVersionError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["SchemaState", "apply_migrations", "check_schema", "check_version", "schema_state"]


@dataclass(frozen=True)
class SchemaState:
    applied: tuple[int, ...]
    known: tuple[int, ...]

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(v for v in self.known if v not in self.applied)

    @property
    def unknown(self) -> tuple[int, ...]:
        return tuple(v for v in self.applied if v not in self.known)

    @property
    def current(self) -> bool:
        return not self.pending and not self.unknown


async def _one_row(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    row = await conn.fetchrow(queries()[query], *args)
    assert row is not None  # these statements always return one row
    return row


async def schema_state(conn: asyncpg.Connection) -> SchemaState:
    """The versions applied and known; raises ChunkdError when this role cannot read them."""
    q = queries()
    known = tuple(m.version for m in migrations())
    access = await _one_row(conn, "schema_access")
    role = quote_role(access["role"])
    if access["schema_exists"] and not access["usage"]:
        raise ChunkdError(
            f"role {access['role']} has no USAGE on schema chunkd: "
            f"GRANT USAGE ON SCHEMA chunkd TO {role}; (as the schema's owner)"
        )
    if not access["migrated"]:
        return SchemaState(applied=(), known=known)
    if access["can_read_version"] is False:
        raise ChunkdError(
            f"role {access['role']} may not execute chunkd.schema_versions(), which tells the "
            f"schema's version: GRANT EXECUTE ON FUNCTION chunkd.schema_versions() TO {role}; "
            "(docs/security.md lists every grant of the worker role)"
        )
    rows = await conn.fetch(q["applied_versions"])
    return SchemaState(applied=tuple(r["version"] for r in rows), known=known)


async def apply_migrations(conn: asyncpg.Connection, *, up_to: int | None = None) -> list[int]:
    """Applies what is missing (up to version ``up_to``, default all); returns the versions
    applied by this call. ``up_to`` is for tests that build an older schema's state.

    Raises :class:`~chunkd.errors.SchemaVersionError` for a schema newer than this chunkd, and
    :class:`~chunkd.errors.ChunkdError` for anything that stops it before it writes (see the
    module docstring) or a migration the server refused (nothing of that one is applied).
    """
    if getattr(conn, "transaction_pooler", False):
        raise ChunkdError(
            "chunkd migrate needs a session connection (it holds an advisory lock across its "
            "transactions): use a direct connection string, or a pooler in session mode "
            "(Supabase: port 5432) with --pooler session"
        )
    q = queries()
    preflight = await _preflight(conn)
    await conn.execute(q["migrate_lock"])
    try:
        state = await schema_state(conn)
        if state.unknown:
            raise SchemaVersionError(_ahead_message(state))
        if state.pending and preflight["read_only"]:
            raise ChunkdError(read_only_message(in_recovery=preflight["in_recovery"]))
        if not state.applied:
            async with conn.transaction():
                await conn.execute(q["pin_search_path"])
                if not await _schema_exists(conn):
                    await conn.execute(q["migrate_create_schema"])
                await conn.execute(q["migrate_bootstrap"])
        applied: list[int] = []
        for migration in migrations():
            if migration.version in state.applied:
                continue
            if up_to is not None and migration.version > up_to:
                break
            try:
                async with conn.transaction():
                    await conn.execute(q["pin_search_path"])
                    await conn.execute(migration.sql)
                    await conn.execute(q["record_version"], migration.version, migration.name)
            except DatabaseError as exc:
                raise ChunkdError(
                    f"migration {migration.version} ({migration.name}) failed: {exc}; "
                    "nothing of it was applied"
                ) from None
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute(q["migrate_unlock"])


async def _schema_exists(conn: asyncpg.Connection) -> bool:
    preflight = await _one_row(conn, "migrate_preflight")
    return preflight["schema_owner"] is not None


async def _preflight(conn: asyncpg.Connection) -> asyncpg.Record:
    """Refuses, before anything is written, what would run foreign code or fail half-way."""
    found = await _one_row(conn, "migrate_preflight")
    role, owner = found["role"], found["schema_owner"]
    if owner is None and found["read_only"]:
        raise ChunkdError(read_only_message(in_recovery=found["in_recovery"]))
    if owner is not None and owner != role:
        # Its owner could have put functions or triggers there that would run as this role.
        raise ChunkdError(
            f"schema chunkd is owned by role {owner}, not by {role} who runs chunkd migrate: "
            f"run chunkd migrate as {owner}, or have {owner} (or a superuser) run "
            f"ALTER SCHEMA chunkd OWNER TO {quote_role(role)}; if you trust what it holds"
        )
    if owner is not None and found["foreign_object"]:
        raise ChunkdError(
            f"schema chunkd holds {found['foreign_object']}, not owned by {role} who owns the "
            "schema and runs chunkd migrate: drop it or change its owner first"
        )
    if owner is None and not found["can_create"]:
        raise ChunkdError(
            f"role {role} may not create schema chunkd in database {found['database']}: "
            f"GRANT CREATE ON DATABASE {quote_role(found['database'])} TO {quote_role(role)}; "
            f"or have a DBA run CREATE SCHEMA chunkd AUTHORIZATION {quote_role(role)};"
        )
    return found


def _ahead_message(state: SchemaState) -> str:
    return (
        f"database schema has version(s) {list(state.unknown)} that this chunkd does not know "
        f"(it knows up to {max(state.known)}): upgrade chunkd"
    )


async def check_version(conn: asyncpg.Connection) -> SchemaState:
    """Raises SchemaVersionError unless the schema is exactly what this chunkd knows."""
    state = await schema_state(conn)
    if state.unknown:
        raise SchemaVersionError(_ahead_message(state))
    if not state.applied:
        raise SchemaVersionError("database has no chunkd schema: run `chunkd migrate`")
    if state.pending:
        raise SchemaVersionError(
            f"database schema is behind (missing version(s) {list(state.pending)}): "
            "run `chunkd migrate`"
        )
    return state


@cache
def daemon_functions() -> tuple[str, ...]:
    """The chunkd functions the daemon's statements call: every named block of
    ``sql/queries.sql`` except the operator commands (``ops_``), the Python client's
    (``client_``), ``migrate_`` and ``chunkd.testing``'s (``testing_``)."""
    names: set[str] = set()
    for name, sql in queries().items():
        if not name.startswith(("ops_", "client_", "migrate_", "testing_")):
            names.update(re.findall(r"\bchunkd\.([a-z_][a-z0-9_]*)\(", sql))
    return tuple(sorted(names))


async def check_schema(conn: asyncpg.Connection) -> SchemaState:
    """``chunkd run``'s start-up check, before it writes anything: the schema's version
    (:func:`check_version`), EXECUTE on every function the daemon calls, a writable database.

    Raises :class:`~chunkd.errors.SchemaVersionError` or :class:`~chunkd.errors.ChunkdError`,
    one line naming what is missing.
    """
    state = await check_version(conn)
    found = await _one_row(conn, "daemon_preflight", list(daemon_functions()))
    missing: list[str] = list(found["not_executable"])
    if missing:
        role = await conn.fetchval(queries()["current_role"])
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ChunkdError(
            f"role {role} may not execute chunkd.{missing[0].removeprefix('chunkd.')}{more}, "
            f"which chunkd run calls: GRANT EXECUTE ON FUNCTION {', '.join(missing)} "
            f"TO {quote_role(role)}; (docs/security.md: the worker role)"
        )
    if found["read_only"]:
        raise ChunkdError(read_only_message(in_recovery=found["in_recovery"]))
    return state
