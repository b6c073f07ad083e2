"""Applying the ordered SQL migrations, and checking the version before the daemon starts.

Each migration runs in its own transaction; all of them run under one session advisory lock,
so two ``chunkd migrate`` at once are safe: the second waits, then finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chunkd.db import DatabaseError
from chunkd.db.sql_files import migrations, queries
from chunkd.errors import ChunkdError, SchemaVersionError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["SchemaState", "apply_migrations", "check_schema", "schema_state"]


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


async def schema_state(conn: asyncpg.Connection) -> SchemaState:
    q = queries()
    known = tuple(m.version for m in migrations())
    if not await conn.fetchval(q["schema_exists"]):
        return SchemaState(applied=(), known=known)
    rows = await conn.fetch(q["applied_versions"])
    return SchemaState(applied=tuple(r["version"] for r in rows), known=known)


async def apply_migrations(conn: asyncpg.Connection) -> list[int]:
    """Applies what is missing; returns the versions applied by this call."""
    q = queries()
    await conn.execute(q["migrate_lock"])
    try:
        state = await schema_state(conn)
        if state.unknown:
            raise SchemaVersionError(_ahead_message(state))
        if not state.applied:
            async with conn.transaction():
                await conn.execute(q["migrate_bootstrap"])
        applied: list[int] = []
        for migration in migrations():
            if migration.version in state.applied:
                continue
            try:
                async with conn.transaction():
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


def _ahead_message(state: SchemaState) -> str:
    return (
        f"database schema has version(s) {list(state.unknown)} that this chunkd does not know "
        f"(it knows up to {max(state.known)}): upgrade chunkd"
    )


async def check_schema(conn: asyncpg.Connection) -> SchemaState:
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
