"""Finding and parsing the SQL shipped with chunkd: ordered migrations and named queries.

In a wheel the files live in ``chunkd/sql``; in an editable checkout they are read from the
repository's top-level ``sql/`` directory, so both install modes use the same files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["Migration", "migrations", "queries", "sql_dir"]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_QUERY_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


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
    for path in sorted(sql_dir().glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"chunkd migrations are not numbered 1..n without gaps: {versions}")
    return tuple(found)


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
