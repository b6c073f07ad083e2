"""``chunkd migrate``: idempotent, safe concurrently, ``--check``, and clear connection errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chunkd.db import connect
from chunkd.db.sql_files import definitions, migrations
from chunkd.redact import redact_dsn


async def _chunkd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chunkd.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
    )  # fmt: skip
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def _empty_database(pg_server, name: str) -> str:
    admin = await connect(pg_server.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return pg_server.dsn(name)


async def _drop(pg_server, name: str) -> None:
    admin = await connect(pg_server.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migrate_twice_is_a_noop_and_check_reports(pg_server) -> None:
    dsn = await _empty_database(pg_server, "chunkd_migrate_twice")
    try:
        behind = await _chunkd("migrate", "--check", "--dsn", dsn)
        assert behind.returncode == 1
        assert behind.stderr.strip() == (
            "chunkd: error: database has no chunkd schema: run `chunkd migrate`"
        )
        first = await _chunkd("migrate", "--dsn", dsn)
        assert first.returncode == 0, first.stderr
        assert "applied migration(s) 1" in first.stdout
        conn = await connect(dsn)
        try:
            before = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'chunkd'"
            )
            second = await _chunkd("migrate", env={"DATABASE_URL": dsn})
            assert second.returncode == 0 and "already current" in second.stdout
            after = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'chunkd'"
            )
            assert before == after
            ok = await _chunkd("migrate", "--check", env={"CHUNKD_DSN": dsn})
            latest = migrations()[-1].version
            assert ok.returncode == 0 and f"current (version {latest})" in ok.stdout
            await conn.execute(
                "INSERT INTO chunkd.schema_migrations VALUES ($1, 'future')", latest + 1
            )
            ahead = await _chunkd("migrate", "--check", "--dsn", dsn)
            assert ahead.returncode == 1 and "does not know" in ahead.stderr
            assert len(ahead.stderr.strip().splitlines()) == 1
            refused = await _chunkd("migrate", "--dsn", dsn)
            assert refused.returncode == 2 and "upgrade chunkd" in refused.stderr
        finally:
            await conn.close()
    finally:
        await _drop(pg_server, "chunkd_migrate_twice")


async def test_two_concurrent_migrate_processes_apply_the_schema_once(pg_server) -> None:
    dsn = await _empty_database(pg_server, "chunkd_migrate_race")
    try:
        results = await asyncio.gather(*(_chunkd("migrate", "--dsn", dsn) for _ in range(2)))
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        outputs = sorted(r.stdout.strip() for r in results)
        everything = ", ".join(str(m.version) for m in migrations())
        n = len(definitions())
        assert outputs == [
            f"applied migration(s) {everything}\napplied the current definitions (all {n} files)",
            "chunkd schema already current: nothing changed",
        ]
        conn = await connect(dsn)
        try:
            rows = await conn.fetch("SELECT version FROM chunkd.schema_migrations")
            assert [r["version"] for r in rows] == [m.version for m in migrations()]
        finally:
            await conn.close()
    finally:
        await _drop(pg_server, "chunkd_migrate_race")


async def test_bad_dsn_is_one_line_without_password_exit_2_or_75_if_it_may_pass_later(
    pg_server,
) -> None:
    # A server out of reach may come back (75, EX_TEMPFAIL: a unit restarts it); a malformed
    # DSN or a database that does not exist will not (2: a unit stops).
    cases = {
        "postgresql://me:s3cretpw@127.0.0.1:1/db": ("Connection refused", 75),
        "postgresql://me:s3cretpw@[bad/db": ("cannot connect", 2),
        pg_server.dsn("no_such_database_here"): ("does not exist", 2),
    }
    for dsn, (expected, code) in cases.items():
        result = await _chunkd("migrate", "--dsn", dsn)
        assert result.returncode == code, (dsn, result.stderr)
        assert result.stderr.startswith("chunkd: error: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr
        assert "s3cretpw" not in result.stderr and "Traceback" not in result.stderr
    missing = await _chunkd("migrate")
    assert missing.returncode == 2 and "--dsn" in missing.stderr


def test_redact_dsn_hides_passwords_in_every_form() -> None:
    assert redact_dsn("postgresql://u:pw@h:5/d") == "postgresql://u:***@h:5/d"
    assert "pw" not in redact_dsn("postgresql://u@h/d?password=pw&sslmode=require")
    assert "pw" not in redact_dsn("host=h user=u password=pw dbname=d")
    assert redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"


async def test_migrations_run_in_one_transaction_each(pg_server) -> None:
    """A failing migration leaves nothing half-applied (checked on the real first migration)."""
    dsn = await _empty_database(pg_server, "chunkd_migrate_tx")
    try:
        conn = await connect(dsn)
        try:
            # A conflicting object makes migration 1 fail part-way through.
            await conn.execute("CREATE SCHEMA chunkd; CREATE TABLE chunkd.workers (x int)")
            result = await _chunkd("migrate", "--dsn", dsn)
            assert result.returncode == 2
            assert result.stderr.startswith("chunkd: error: migration 1 (queue) failed: ")
            assert "Traceback" not in result.stderr
            assert await conn.fetchval("SELECT to_regclass('chunkd.sync_jobs')") is None
            versions = await conn.fetchval(
                "SELECT count(*) FROM chunkd.schema_migrations"
            )  # the bootstrap committed, the migration did not
            assert versions == 0
        finally:
            await conn.close()
    finally:
        await _drop(pg_server, "chunkd_migrate_tx")


def _copy_of_chunkd(tmp_path: Path) -> Path:
    """This checkout's package and SQL files, copied (to break the copy's SQL)."""
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "daemon", tmp_path / "daemon", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copytree(root / "sql", tmp_path / "sql")
    return tmp_path


@pytest.mark.parametrize("broken", ["unlisted", "missing"])
async def test_definition_files_out_of_step_with_the_manifest_stop_migrate_before_it_writes(
    pg_server, tmp_path: Path, broken: str
) -> None:
    """A definitions file not in sql/definitions.txt, or a listed one missing: one line, and
    nothing applied (it was a RuntimeError's traceback after the versioned migrations ran)."""
    copy = _copy_of_chunkd(tmp_path)
    if broken == "unlisted":
        (copy / "sql" / "functions" / "extra.sql").write_text("-- not in the manifest\n")
        expected = (
            "chunkd: error: chunkd's SQL files do not match sql/definitions.txt: functions/"
            "extra.sql is not listed there (list it, after the files it uses); nothing was applied"
        )
    else:
        (copy / "sql" / "functions" / "claim.sql").unlink()
        expected = (
            "chunkd: error: chunkd's SQL files do not match sql/definitions.txt: functions/"
            "claim.sql is listed there but missing; nothing was applied"
        )
    dsn = await _empty_database(pg_server, f"chunkd_migrate_{broken}")
    try:
        env = {"PYTHONPATH": str(copy / "daemon")}
        result = await _chunkd("migrate", "--dsn", dsn, env=env)
        assert result.stderr.strip() == expected
        assert result.returncode == 2 and result.stdout == ""
        conn = await connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regnamespace('chunkd')") is None
        finally:
            await conn.close()
    finally:
        await _drop(pg_server, f"chunkd_migrate_{broken}")


async def test_a_failing_definitions_file_is_named_with_its_line(database, tmp_path: Path) -> None:
    copy = _copy_of_chunkd(tmp_path)
    progress = copy / "sql" / "functions" / "progress.sql"
    lines = progress.read_text().splitlines(keepends=True)
    lines.insert(3, "SELEC 1;\n")  # line 4
    progress.write_text("".join(lines))
    result = await _chunkd(
        "migrate", "--dsn", database.dsn, env={"PYTHONPATH": str(copy / "daemon")}
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "chunkd: error: applying the current definitions failed: sql/functions/progress.sql, "
        'line 4: syntax error at or near "SELEC"; nothing of them was applied'
    )
