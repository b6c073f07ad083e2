"""Applying the versioned migrations and the current definitions, and checking the schema
before the daemon starts.

Each versioned migration (``sql/migrations/``) runs in its own transaction, with
``search_path`` pinned to ``pg_catalog``; then the current definitions whose files changed are
re-applied in one more (:mod:`chunkd.db.definitions`). All of it runs under one session
advisory lock, so two ``chunkd migrate`` at once are safe: the second waits, then finds nothing
to do. A step that drops a function or view that running daemons of another chunkd release
call is refused (a rolling upgrade: :mod:`chunkd.db.drops`). Before anything is written,
:func:`apply_migrations`
checks what would make it fail half-way or run someone else's code: a read-only database, a
``chunkd`` schema (or an object in it) owned by another role, no right to create the schema,
a transaction pooler. :func:`check_schema` does the same for ``chunkd run``: the schema's
version, and every privilege the daemon's statements need.

A running fleet meets every step: each step's transaction waits at most 50 ms for a lock (200
ms while the sessions in its way come and go): a trigger's SHARE ROW EXCLUSIVE, an index's
SHARE, a column's ACCESS EXCLUSIVE would otherwise queue every claim and enqueue behind it. A
try that times out is rolled back and run again until
``lock_wait_s`` has passed; then one line names the session in the way
(:func:`chunkd.db.locks.with_lock_retry`). Migrations 2, 3 and 5 to 8 (released) and 9 carry a
``SET LOCAL lock_timeout = '60s'`` of their own, which overrides it for their statements;
migrations from version 10 on must not set one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache, cmp_to_key
from typing import TYPE_CHECKING

from chunkd.db.connection import DatabaseError, sqlstate
from chunkd.db.definitions import (
    DefinitionFailed,
    Grant,
    apply_definitions,
    compare_versions,
    grants_snapshot,
    schema_objects,
    successors,
)
from chunkd.db.drops import refuse_drops
from chunkd.db.locks import DEFAULT_LOCK_WAIT_S, Wanted, with_lock_retry
from chunkd.db.server_errors import quote_role, read_only_message
from chunkd.db.sql_files import (
    Migration,
    SqlFilesError,
    definitions,
    lock_head,
    migrations,
    queries,
)
from chunkd.errors import ChunkdError, SchemaVersionError
from chunkd.version import __version__

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "Migrated",
    "SchemaState",
    "apply_migrations",
    "check_schema",
    "check_version",
    "schema_state",
]

#: What a step without a LOCK TABLE first may lock: any relation of the schema, in any mode.
_ANY_LOCK = (Wanted("chunkd.*", "AccessExclusiveLock"),)
_ANY_READ = Wanted("chunkd.*", "AccessShareLock")


def _wanted(migration: Migration) -> tuple[Wanted, ...]:
    """The locks a migration takes, in order, to name the session in its way when it gives
    up: its LOCK TABLE, then a read of any relation (in the way of ACCESS EXCLUSIVE only); any
    lock on any relation when it does not begin with a LOCK TABLE."""
    head = lock_head(migration.sql)
    if head is None:
        return _ANY_LOCK
    return (*(Wanted(table, head[1]) for table in head[0]), _ANY_READ)


def _definitions_wanted() -> tuple[Wanted, ...]:
    """As :func:`_wanted`, for the definitions: in the manifest's order, each view (replaced:
    ACCESS EXCLUSIVE) and each file's LOCK TABLE (functions take no table lock)."""
    found: list[Wanted] = []
    for d in definitions():
        found += [Wanted(f"chunkd.{o.name}", "AccessExclusiveLock") for o in d.objects
                  if o.kind == "view"]  # fmt: skip
        head = lock_head(d.sql)
        found += [Wanted(table, head[1]) for table in head[0]] if head else []
    return (*found, _ANY_READ)


@dataclass(frozen=True)
class SchemaState:
    """Versioned migrations applied and known; ``newer_definitions``: the chunkd version whose
    definitions the database holds when it is newer than this one (a rolling upgrade is under
    way: this process keeps working, but should be upgraded)."""

    applied: tuple[int, ...]
    known: tuple[int, ...]
    newer_definitions: str | None = None

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(v for v in self.known if v not in self.applied)

    @property
    def unknown(self) -> tuple[int, ...]:
        return tuple(v for v in self.applied if v not in self.known)

    @property
    def current(self) -> bool:
        return not self.pending and not self.unknown


@dataclass(frozen=True)
class Migrated:
    """What one :func:`apply_migrations` call applied: versioned migrations by version, then
    definition files by path (relative to ``sql/``)."""

    versions: list[int]
    definitions: tuple[str, ...] = ()

    @property
    def nothing(self) -> bool:
        return not self.versions and not self.definitions


async def _one_row(
    conn: asyncpg.Connection | PoolConnectionProxy, query: str, *args: object
) -> asyncpg.Record:
    row = await conn.fetchrow(queries()[query], *args)
    assert row is not None  # these statements always return one row
    return row


async def schema_state(conn: asyncpg.Connection | PoolConnectionProxy) -> SchemaState:
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


async def apply_migrations(
    conn: asyncpg.Connection,
    *,
    up_to: int | None = None,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
    reapply_edited: bool = False,
) -> Migrated:
    """Applies the versioned migrations that are missing, then the definition files that
    changed; returns what it applied.

    ``up_to`` (for tests that build an older release's schema) stops after that version and
    applies no definitions: the files hold the current release's, which may need later tables.
    ``lock_wait_s``: how long each step keeps trying for its locks (in tries of 50 to 200 ms).
    ``reapply_edited``: also re-apply the definition files whose objects were changed by hand
    since chunkd migrate applied them (what ``chunkd doctor`` reports).

    Raises :class:`~chunkd.errors.SchemaVersionError` for a schema newer than this chunkd, and
    :class:`~chunkd.errors.ChunkdError` for anything that stops it before it writes (see the
    module docstring; :class:`~chunkd.db.sql_files.SqlFilesError`: chunkd's own SQL files do
    not fit together), a step the server refused (nothing of that step is applied), a step
    that would drop what running daemons of another version call, or a step that did not get
    its locks within ``lock_wait_s`` (:class:`~chunkd.db.locks.LockWaitError`, naming the
    session that holds them).
    """
    try:  # chunkd's own files, read before anything is written
        migrations()
        definitions()
    except SqlFilesError as exc:
        raise SqlFilesError(f"{exc}; nothing was applied") from None
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
        grants = await grants_snapshot(conn)
        applied: list[int] = []
        for migration in migrations():
            if migration.version in state.applied:
                continue
            if up_to is not None and migration.version > up_to:
                return Migrated(applied)
            step = f"migration {migration.version} ({migration.name})"

            async def apply(migration: Migration = migration, step: str = step) -> None:
                before = await schema_objects(conn)
                await conn.execute(q["pin_search_path"])
                await conn.execute(migration.sql)
                await conn.execute(q["record_version"], migration.version, migration.name)
                await refuse_drops(conn, before, step)

            try:
                wanted = _wanted(migration)
                await with_lock_retry(conn, apply, what=step, wanted=wanted, wait_s=lock_wait_s)
            except DatabaseError as exc:
                raise ChunkdError(f"{step} failed: {exc}; nothing of it was applied") from None
            applied.append(migration.version)
        if up_to is not None and up_to < migrations()[-1].version:
            return Migrated(applied)
        definitions_applied = await _apply_definitions(
            conn, grants, preflight, bool(applied), lock_wait_s, reapply_edited
        )
        return Migrated(applied, definitions_applied)
    finally:
        await conn.execute(q["migrate_unlock"])


async def _apply_definitions(
    conn: asyncpg.Connection,
    grants: list[Grant],
    preflight: asyncpg.Record,
    migrated: bool,
    lock_wait_s: float,
    reapply_edited: bool,
) -> tuple[str, ...]:
    step = "the current definitions"

    async def apply() -> tuple[str, ...]:
        before = await schema_objects(conn)
        applied = await apply_definitions(
            conn, grants, migrated=migrated, reapply_edited=reapply_edited
        )
        await refuse_drops(conn, before, step, successors=successors())
        return applied

    try:
        wanted = _definitions_wanted()
        applied = await with_lock_retry(conn, apply, what=step, wanted=wanted, wait_s=lock_wait_s)
    except (DatabaseError, DefinitionFailed) as exc:
        if preflight["read_only"]:
            raise ChunkdError(read_only_message(in_recovery=preflight["in_recovery"])) from None
        raise ChunkdError(
            f"applying the current definitions failed: {exc}; nothing of them was applied"
        ) from None
    return applied


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
    """Raises SchemaVersionError unless the schema is what this chunkd knows: every versioned
    migration applied, none unknown, and the definitions this chunkd ships (or those of a newer
    chunkd: then :attr:`SchemaState.newer_definitions` says which)."""
    state = await _check_versions(conn)
    return replace(state, newer_definitions=await _definitions_check(conn))


async def _check_versions(conn: asyncpg.Connection) -> SchemaState:
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


async def _definitions_check(conn: asyncpg.Connection) -> str | None:
    """None when the database holds this chunkd's definitions; the newer chunkd version whose
    definitions it holds; raises SchemaVersionError when they are behind."""
    try:
        rows = await conn.fetch(queries()["definitions_applied"])
    except DatabaseError as exc:
        if sqlstate(exc) != "42883":  # undefined_function: never applied
            raise
        rows = []
    recorded = {r["path"]: r for r in rows}
    differ = [d.path for d in definitions() if d.path not in recorded
              or recorded[d.path]["checksum"] != d.checksum]  # fmt: skip
    if not differ:
        return None
    newer: list[str] = [recorded[p]["applied_by"] for p in differ if p in recorded
             and compare_versions(recorded[p]["applied_by"], __version__) > 0]  # fmt: skip
    if newer and len(newer) == len(differ):
        return max(newer, key=cmp_to_key(compare_versions))
    more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
    raise SchemaVersionError(
        f"the schema's definitions are behind this chunkd (sql/{differ[0]}{more} changed): "
        "run `chunkd migrate`"
    )


@cache
def daemon_functions() -> tuple[str, ...]:
    """The chunkd functions the daemon's statements call: every named block of
    ``sql/queries.sql`` except the operator commands (``ops_``), the Python client's
    (``client_``), ``migrate_``, ``chunkd doctor``'s (``doctor_``) and ``chunkd.testing``'s
    (``testing_``)."""
    names: set[str] = set()
    for name, sql in queries().items():
        if not name.startswith(("ops_", "client_", "migrate_", "doctor_", "testing_")):
            names.update(re.findall(r"\bchunkd\.([a-z_][a-z0-9_]*)\(", sql))
    return tuple(sorted(names))


async def check_schema(conn: asyncpg.Connection) -> SchemaState:
    """``chunkd run``'s start-up check, before it writes anything: the schema's versions,
    EXECUTE on every function the daemon calls, a writable database, then the definitions (as
    :func:`check_version`).

    Raises :class:`~chunkd.errors.SchemaVersionError` or :class:`~chunkd.errors.ChunkdError`,
    one line naming what is missing.
    """
    state = await _check_versions(conn)
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
    return replace(state, newer_definitions=await _definitions_check(conn))
