"""Finding and parsing the SQL shipped with chunkd: versioned migrations, current definitions
and named queries.

``sql/migrations/NNNN_name.sql`` change tables (forward only, each applied once);
``sql/definitions.txt`` lists, in the order they are applied, the files that hold every
function, view and trigger once, in its current form (re-applied when their checksum changes:
:mod:`chunkd.db.migrate`). In a wheel the files live in ``chunkd/sql``; in an editable checkout
they are read from the repository's top-level ``sql/`` directory, so both install modes use the
same files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from chunkd.errors import ChunkdError

__all__ = [
    "DefinedObject",
    "Definition",
    "GrantCarry",
    "Migration",
    "SqlFilesError",
    "definitions",
    "lock_head",
    "migrations",
    "queries",
    "sql_dir",
]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# What a definitions file creates: `CREATE OR REPLACE FUNCTION chunkd.name(`, `... VIEW
# chunkd.name`, `CREATE OR REPLACE TRIGGER name` / `CREATE CONSTRAINT TRIGGER name`, at the
# start of a line (the files' own style; tests/test_sql_layout.py checks every object is found).
_DEFINED = re.compile(
    r"^CREATE (?:OR REPLACE )?(?:CONSTRAINT )?(FUNCTION|VIEW|TRIGGER) "
    r"(?:chunkd\.)?([a-z_][a-z0-9_]*)",
    re.MULTILINE,
)
# `-- carry grants: chunkd.old(args) -> chunkd.new(args)`: a function that replaces another
# gets the EXECUTE grants the old one had when it is first created.
_CARRY = re.compile(r"^-- carry grants: (chunkd\.\S+\(.*?\)) -> (chunkd\.\S+\(.*?\))\s*$", re.M)
_QUERY_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
# The LOCK TABLE that opens a step (docs/migrations.md, The lock order), comments aside.
_LOCK_HEAD = re.compile(
    r"\s*LOCK\s+TABLE\s+(chunkd\.\w+(?:\s*,\s*chunkd\.\w+)*)\s+IN\s+([A-Z ]+?)\s+MODE\s*;",
    re.IGNORECASE,
)


class SqlFilesError(ChunkdError):
    """chunkd's own SQL files do not fit together (a broken installation, or a checkout whose
    manifest was not updated): one line saying what to change."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class DefinedObject:
    """A function (all overloads of the name), view or trigger a definitions file creates."""

    kind: str  # "function", "view" or "trigger"
    name: str


@dataclass(frozen=True)
class GrantCarry:
    """``old`` and ``new`` as ``regprocedure`` text: ``new`` inherits ``old``'s grants."""

    old: str
    new: str


@dataclass(frozen=True)
class Definition:
    """One file of current definitions: its path under ``sql/`` and what it creates."""

    path: str
    sql: str
    objects: tuple[DefinedObject, ...]
    carries: tuple[GrantCarry, ...]

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, hex: what ``chunkd.schema_definitions`` records."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@cache
def sql_dir() -> Path:
    packaged = resources.files("chunkd") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[3] / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("chunkd's SQL files are missing from this installation")


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations in version order; gaps or duplicate versions are a packaging bug."""
    found: list[Migration] = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SqlFilesError(f"chunkd's migrations are not numbered 1..n without gaps: {versions}")
    return tuple(found)


@cache
def definitions() -> tuple[Definition, ...]:
    """The current definitions, in the order of ``sql/definitions.txt``.

    Raises :class:`SqlFilesError` for a listed file that is missing, a file under
    ``functions/``, ``views/`` or ``triggers/`` that is not listed, or an object defined twice.
    """
    base = sql_dir()
    listed = [
        line.strip()
        for line in (base / "definitions.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    on_disk = {
        str(p.relative_to(base))
        for folder in ("functions", "views", "triggers")
        for p in (base / folder).glob("*.sql")
    }
    if set(listed) != on_disk or len(listed) != len(on_disk):
        raise SqlFilesError(
            "chunkd's SQL files do not match sql/definitions.txt: " + _differences(listed, on_disk)
        )
    found: list[Definition] = []
    seen: dict[DefinedObject, str] = {}
    for path in listed:
        text = (base / path).read_text(encoding="utf-8")
        objects = tuple(
            dict.fromkeys(
                DefinedObject(kind.lower(), name) for kind, name in _DEFINED.findall(text)
            )
        )
        for obj in objects:
            if obj in seen:
                raise SqlFilesError(
                    f"chunkd's SQL files define {obj.kind} {obj.name} twice: in {seen[obj]} "
                    f"and {path}"
                )
            seen[obj] = path
        carries = tuple(GrantCarry(old, new) for old, new in _CARRY.findall(text))
        found.append(Definition(path, text, objects, carries))
    return tuple(found)


def _differences(listed: list[str], on_disk: set[str]) -> str:
    def some(paths: list[str], what: str) -> str:
        verb = "is" if len(paths) == 1 else "are"
        return (
            paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "") + f" {verb} {what}"
        )

    missing = sorted(set(listed) - on_disk)
    unlisted = sorted(on_disk - set(listed))
    twice = sorted({p for p in listed if listed.count(p) > 1})
    found = [some(missing, "listed there but missing")] if missing else []
    if unlisted:
        found.append(some(unlisted, "not listed there (list it, after the files it uses)"))
    if twice:
        found.append(some(twice, "listed twice"))
    return "; ".join(found)


def lock_head(sql: str) -> tuple[tuple[str, ...], str] | None:
    """The tables and the mode (as ``pg_locks`` spells it: ``AccessExclusiveLock``) of the
    ``LOCK TABLE`` that opens ``sql``, comments aside; None when it does not open with one."""
    found = _LOCK_HEAD.match(re.sub(r"--[^\n]*", "", sql))
    if found is None:
        return None
    tables = tuple(t.strip() for t in found[1].split(","))
    mode = "".join(word.capitalize() for word in found[2].split()) + "Lock"
    return tables, mode


@cache
def queries(filename: str = "queries.sql") -> dict[str, str]:
    """Named blocks of a query file; a duplicate name is a bug caught at load time."""
    text = (sql_dir() / filename).read_text(encoding="utf-8")
    parts = _QUERY_HEADER.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in named:
            raise RuntimeError(f"duplicate query name {name!r} in {filename}")
        named[name] = body.strip()
    return named
