"""What a database's chunkd schema is, as ``pg_dump --schema-only --schema=chunkd`` prints it,
normalised for ordering: the catalog two databases must share after any upgrade path."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from chunkd.demo.cluster import ClusterError, find_bin_dir
from resources import missing


def _pg_dump() -> str:
    try:
        candidate = find_bin_dir() / "pg_dump"
        if candidate.is_file():
            return str(candidate)
    except ClusterError:
        pass
    found = shutil.which("pg_dump")
    if found is None:
        missing("pg_dump (PostgreSQL's client binaries) is needed to compare catalogs")
    return found


def schema_script(dsn: str) -> str:
    """Schema chunkd and its rows as one SQL script (``pg_dump --inserts``, no owners or
    grants), as an operator's dump for a restore into another database (psql's meta-commands,
    such as pg_dump's ``\\restrict``, left out: the script runs through asyncpg)."""
    script = subprocess.run(
        [_pg_dump(), "--schema=chunkd", "--inserts", "--no-owner", "--no-privileges",
         "--dbname", dsn],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return "\n".join(line for line in script.splitlines() if not line.startswith("\\"))


def schema_dump(dsn: str) -> list[str]:
    """The schema's DDL, grants and owners, one entry per object (pg_dump's own sections),
    sorted; pg_dump's per-run restrict key and version banner left out."""
    result = subprocess.run(
        [_pg_dump(), "--schema-only", "--schema=chunkd", "--dbname", dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
    )
    # pg_dump opens each object with a "-- Name: ...; Type: ...; Schema: ...; Owner: ..." block.
    entries = re.split(r"\n(?=--\n-- (?:Name|Data for Name): )", text)
    return sorted(entry.strip() for entry in entries if entry.strip())


def first_difference(a: list[str], b: list[str]) -> str:
    """A short report of how two dumps differ, for an assertion message."""
    only_a = [e for e in a if e not in b]
    only_b = [e for e in b if e not in a]
    head = (only_a[:1] or ["(nothing)"])[0][:1500]
    tail = (only_b[:1] or ["(nothing)"])[0][:1500]
    return f"{len(only_a)} entries differ; first only in one:\n{head}\n--- the other:\n{tail}"


def released_migration_files() -> list[Path]:
    from chunkd.db.sql_files import sql_dir

    return sorted((sql_dir() / "migrations").glob("*.sql"))
