"""Applying the current definitions: every function, view and trigger, kept once in its current
form (``sql/definitions.txt``), re-applied when its file changes.

The pattern of Flyway's repeatable migrations and Sqitch's rework: what holds data changes
forward only (versioned migrations, :mod:`chunkd.db.migrate`), code is kept as it is now. After
the versioned migrations, :func:`apply_definitions` re-applies, in the manifest's order and in
one transaction, each file whose SHA-256 differs from the one recorded in
``chunkd.schema_definitions`` or that defines an object missing from the catalog, then records
the checksums and a fingerprint of what the catalog holds (``chunkd doctor`` compares it with
the catalog later, to find definitions changed by hand).

Grants survive: privileges other roles held on a function or view before the migrate run are
given back if a definition was dropped and created again, and a file may declare that a new
function inherits an old one's grants (``-- carry grants: chunkd.old(...) -> chunkd.new(...)``),
so an operator's worker role keeps working across a changed signature.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from chunkd.db.connection import DatabaseError
from chunkd.db.sql_files import Definition, definitions, queries
from chunkd.version import __version__

__all__ = [
    "DefinitionFailed",
    "DefinitionsState",
    "Grant",
    "apply_definitions",
    "catalog_state",
    "compare_versions",
    "grants_snapshot",
    "restore_grants",
    "schema_objects",
    "successors",
]


class DefinitionFailed(Exception):
    """The server refused a definitions file: ``path`` (under ``sql/``), ``line`` (of the file,
    where the server gave a position) and its ``error``."""

    def __init__(self, path: str, line: int | None, error: DatabaseError):
        where = f"sql/{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {error}")
        self.path, self.line, self.error = path, line, error


# A try that did not get its locks is tried again (chunkd.db.locks): not a failed file.
_NOT_THE_FILE = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.DeadlockDetectedError)


async def _apply_file(conn: asyncpg.Connection, definition: Definition) -> None:
    try:
        await conn.execute(definition.sql)
    except _NOT_THE_FILE:
        raise
    except DatabaseError as exc:
        position = getattr(exc, "position", None)
        line = None
        if position is not None and str(position).isdigit():
            line = definition.sql[: int(position) - 1].count("\n") + 1
        raise DefinitionFailed(definition.path, line, exc) from exc


@dataclass(frozen=True)
class Grant:
    """One privilege a role other than the owner holds on a function or a view."""

    kind: str  # "FUNCTION" or "TABLE" (a view), as GRANT spells it
    object: str  # as the catalog prints it: regprocedure or regclass text
    grantee: str
    privilege: str
    grantable: bool


@dataclass(frozen=True)
class DefinitionsState:
    """What the catalog holds of each definitions file, against what was recorded.

    ``changed``: files whose checksum differs from the recorded one, or never recorded;
    ``missing``: files with an object absent from the catalog; ``edited``: files whose catalog
    fingerprint differs from the one recorded when they were applied (changed by hand).
    """

    changed: tuple[str, ...]
    missing: tuple[str, ...]
    edited: tuple[str, ...]
    fingerprints: dict[str, str]

    @property
    def to_apply(self) -> tuple[str, ...]:
        wanted = set(self.changed) | set(self.missing)
        return tuple(d.path for d in definitions() if d.path in wanted)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as chunkd version ``a`` is older than, equal to or newer than ``b``
    (numeric parts compared in order: ``0.10.0`` is newer than ``0.9.1``)."""
    left = tuple(int(n) for n in re.findall(r"\d+", a))
    right = tuple(int(n) for n in re.findall(r"\d+", b))
    return (left > right) - (left < right)


async def catalog_state(
    conn: asyncpg.Connection, *, through_function: bool = False
) -> DefinitionsState:
    """Reads the recorded checksums and the catalog: from the table as the schema's owner
    (``chunkd migrate``), or ``through_function`` ``chunkd.schema_definitions()`` for a role
    with only EXECUTE (``chunkd doctor``). Raises what the server raised."""
    q = queries()
    files = definitions()
    recorded_query = "definitions_applied" if through_function else "definitions_recorded"
    paths, kinds, names = [], [], []
    for d in files:
        for obj in d.objects:
            paths.append(d.path)
            kinds.append(obj.kind)
            names.append(obj.name)
    async with conn.transaction():
        # The catalog qualifies the names it prints as the search_path needs: one fixed path
        # makes the fingerprint the same whatever the session's (a role may set chunkd in it).
        await conn.execute(q["pin_search_path"])
        recorded = {r["path"]: r for r in await conn.fetch(q[recorded_query])}
        rows = await conn.fetch(q["definitions_catalog"], paths, kinds, names)
    catalog = {r["path"]: r for r in rows}
    changed = tuple(
        d.path
        for d in files
        if d.path not in recorded or recorded[d.path]["checksum"] != d.checksum
    )
    missing = tuple(d.path for d in files if d.path in catalog and catalog[d.path]["missing"])
    edited = tuple(
        d.path
        for d in files
        if d.path in recorded
        and d.path not in changed
        and d.path in catalog
        and recorded[d.path]["fingerprint"] != catalog[d.path]["fingerprint"]
    )
    fingerprints = {path: row["fingerprint"] for path, row in catalog.items()}
    return DefinitionsState(changed, missing, edited, fingerprints)


async def schema_objects(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    """(kind, object) of every function and view of schema chunkd (see :class:`Grant`)."""
    return {(r["kind"], r["object"]) for r in await conn.fetch(queries()["schema_objects"])}


async def grants_snapshot(conn: asyncpg.Connection) -> list[Grant]:
    """Every privilege roles other than the owner hold on chunkd's functions and views."""
    rows = await conn.fetch(queries()["schema_grants"])
    return [Grant(*row) for row in rows]


async def restore_grants(
    conn: asyncpg.Connection, before: Iterable[Grant], carries: Iterable[tuple[str, str]]
) -> int:
    """Gives back what ``before`` held and the objects now lack (a definition dropped and
    created again), and to each new function of ``carries`` (old, new) the grants the old one
    had, if the new one did not exist before. Returns how many GRANTs it ran."""
    before = list(before)
    existed = {g.object for g in before}
    now = {(g.kind, g.object, g.grantee, g.privilege) for g in await grants_snapshot(conn)}
    objects = await schema_objects(conn)
    wanted = list(before)
    for old, new in carries:
        if new not in existed:
            wanted += [
                Grant(g.kind, new, g.grantee, g.privilege, g.grantable)
                for g in before
                if g.object == old and g.kind == "FUNCTION"
            ]
    granted = 0
    for g in wanted:
        if (g.kind, g.object, g.grantee, g.privilege) in now:
            continue
        if (g.kind, g.object) not in objects:
            continue  # dropped for good by a migration: nothing to give back
        statement = await conn.fetchval(
            queries()["grant_statement"], g.kind, g.object, g.privilege, g.grantee, g.grantable
        )
        await conn.execute(statement)
        now.add((g.kind, g.object, g.grantee, g.privilege))
        granted += 1
    return granted


async def apply_definitions(
    conn: asyncpg.Connection,
    grants_before: Sequence[Grant],
    *,
    migrated: bool = False,
    reapply_edited: bool = False,
) -> tuple[str, ...]:
    """Re-applies the definition files that changed or lost an object, inside the caller's
    transaction (it holds the migrate lock; this pins ``search_path``); returns their paths, in
    the order applied. ``grants_before``: :func:`grants_snapshot` taken before the versioned
    migrations ran; ``migrated``: whether versioned migrations ran just before;
    ``reapply_edited``: also the files whose objects were changed by hand since. Raises
    :class:`DefinitionFailed` for a file the server refused, what the server raised otherwise
    (a lock not got, among others)."""
    q = queries()
    await conn.execute(q["pin_search_path"])
    state = await catalog_state(conn)
    wanted = {*state.to_apply, *(state.edited if reapply_edited else ())}
    todo = [d for d in definitions() if d.path in wanted]
    # Also what the versioned migrations just granted (0005 carried create_sync_job's grants
    # to its 12-argument form, which a definition now replaces in turn).
    held = [*grants_before, *await grants_snapshot(conn)] if todo else []
    for definition in todo:
        await _apply_file(conn, definition)
    await _settle(conn, todo)
    if todo:
        await conn.execute(q["revoke_public"])
        await restore_grants(conn, held, _carries(todo))
    if todo or migrated:
        # What the catalog holds now is what was shipped: record it (a versioned migration may
        # have changed how an untouched definition reads). Otherwise write nothing: a hand edit
        # stays visible to `chunkd doctor`, and a current read-only database stays untouched.
        await _record(conn, todo, await catalog_state(conn))
    return tuple(d.path for d in todo)


def successors() -> dict[str, str]:
    """Old function -> the new one of the same name that a definitions file says inherits its
    grants (``-- carry grants: chunkd.f(a) -> chunkd.f(a,b)``): the old one's arguments and more,
    with defaults (``tests/test_sql_layout.py`` checks), so every call of the old one finds the
    new one, and dropping the old one in the same transaction breaks no caller."""
    return {
        c.old: c.new
        for d in definitions()
        for c in d.carries
        if c.old.split("(", 1)[0] == c.new.split("(", 1)[0]
    }


async def _settle(conn: asyncpg.Connection, applied: Sequence[Definition], rounds: int = 4) -> None:
    """Re-applies each SQL-standard function body of ``applied`` from the catalog's own print
    until the print stops changing (one round suffices on PostgreSQL 15), so that the recorded
    fingerprint is what a dump restored elsewhere prints too, not a hand edit."""
    names = sorted({o.name for d in applied for o in d.objects if o.kind == "function"})
    if not names:
        return
    query = queries()["definitions_sql_bodies"]
    printed = {r["function"]: r["def"] for r in await conn.fetch(query, names)}
    for _ in range(rounds):
        for text in printed.values():
            await conn.execute(text)
        again = {r["function"]: r["def"] for r in await conn.fetch(query, names)}
        printed = {f: text for f, text in again.items() if printed.get(f) != text}
        if not printed:
            return


def _carries(applied: Iterable[Definition]) -> list[tuple[str, str]]:
    return [(c.old, c.new) for d in applied for c in d.carries]


async def _record(
    conn: asyncpg.Connection, applied: Sequence[Definition], after: DefinitionsState
) -> None:
    q = queries()
    paths = [d.path for d in applied]
    await conn.execute(
        q["definitions_record"],
        paths,
        [d.checksum for d in applied],
        [after.fingerprints[p] for p in paths],
        __version__,
    )
    await conn.execute(
        q["definitions_refingerprint"], list(after.fingerprints), list(after.fingerprints.values())
    )
    await conn.execute(q["definitions_forget"], [d.path for d in definitions()])
