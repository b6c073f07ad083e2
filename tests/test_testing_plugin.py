"""The pytest plugin as an application uses it: pytest in a subprocess on examples/app-quickstart
(its tests are the acceptance of issue 23: drain, a chunk run twice, a lost lease, a kill),
``-p chunkd.testing`` without the entry point, and the one line when no PostgreSQL is there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import pytest

from chunkd.db import connect
from chunkd.testing.server import TestServer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "app-quickstart"


def _pytest(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "CHUNKD_TEST_DSN")}
    full.pop("PYTHONPATH", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_testing_page_shows_the_example_as_it_is() -> None:
    """docs/testing.md's complete example is the tested one, file for file."""
    from doc_snippets import blocks

    shown = {}
    for block in blocks(ROOT / "docs" / "testing.md"):
        first, _, rest = block.text.partition("\n")
        if block.lang in ("python", "toml") and first.startswith("# "):
            shown[first[2:]] = rest
    assert sorted(shown) == [
        "myapp/tasks.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_tasks.py",
    ]
    for path, text in shown.items():
        assert text == (QUICKSTART / path).read_text(), f"docs/testing.md: {path} differs"


@pytest.mark.slow
def test_the_quickstart_examples_tests_pass(pg_server: TestServer) -> None:
    done = _pytest(QUICKSTART, env={"CHUNKD_TEST_DSN": pg_server.admin_dsn})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("8 passed"), done.stdout


def test_p_chunkd_testing_loads_the_fixture_without_the_entry_point(
    pg_server: TestServer, tmp_path: Path
) -> None:
    (tmp_path / "test_dsn.py").write_text(
        textwrap.dedent("""
            import asyncio

            import asyncpg


            def test_a_fresh_migrated_database(chunkd_dsn):
                async def tables():
                    conn = await asyncpg.connect(chunkd_dsn)
                    try:
                        return await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs")
                    finally:
                        await conn.close()

                assert asyncio.run(tables()) == 0
        """)
    )
    env = {"CHUNKD_TEST_DSN": pg_server.admin_dsn, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    without = _pytest(tmp_path, env=env)
    assert "fixture 'chunkd_dsn' not found" in without.stdout
    done = _pytest(tmp_path, "-p", "chunkd.testing", env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def _conninfo(uri: str, **override: str) -> str:
    """``uri`` (the session server's DSN) in libpq's key=value form, keys overridden."""
    parts = urlsplit(uri)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    pairs = {
        "host": query.pop("host", parts.hostname or ""),
        "port": query.pop("port", str(parts.port or 5432)),
        "user": unquote(parts.username or ""),
        "dbname": unquote(parts.path.lstrip("/")) or "postgres",
    }
    if parts.password:
        pairs["password"] = unquote(parts.password)
    pairs.update(query, **override)
    return " ".join(f"{key}='{value}'" for key, value in pairs.items() if value)


async def _templates(server: TestServer) -> set[str]:
    conn = await connect(server.admin_dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'chunkd\\_template\\_%'"
        )
    finally:
        await conn.close()
    return {row["datname"] for row in rows}


A_DATABASE_TEST = """
    import asyncio

    import asyncpg


    def test_a_fresh_migrated_database(chunkd_dsn):
        async def tables():
            conn = await asyncpg.connect(chunkd_dsn)
            try:
                return await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs")
            finally:
                await conn.close()

        assert asyncio.run(tables()) == 0
"""


def test_a_key_value_chunkd_test_dsn_works_and_leaves_no_template(
    pg_server: TestServer, tmp_path: Path
) -> None:
    """``CHUNKD_TEST_DSN="host=... port=... user=... dbname=postgres"``, libpq's other form:
    the test databases' DSNs are made from it, and the run's template is dropped."""
    (tmp_path / "test_db.py").write_text(textwrap.dedent(A_DATABASE_TEST))
    before = asyncio.run(_templates(pg_server))
    done = _pytest(tmp_path, env={"CHUNKD_TEST_DSN": _conninfo(pg_server.admin_dsn)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("1 passed"), done.stdout
    assert asyncio.run(_templates(pg_server)) <= before


def test_a_template_that_fails_to_migrate_is_dropped(pg_server: TestServer, tmp_path: Path) -> None:
    """The template is dropped even when migrating it fails: here its role may create
    databases, but the new ones are read-only for it (a role-wide setting that the admin
    database alone overrides), so the migration fails on the real server."""
    tag = uuid.uuid4().hex[:8]
    role, admin_db = f"chunkd_ro_{tag}", f"chunkd_admin_{tag}"

    async def setup() -> None:
        conn = await connect(pg_server.admin_dsn)
        try:
            await conn.execute(f"CREATE ROLE \"{role}\" LOGIN CREATEDB PASSWORD '{role}'")
            await conn.execute(f'CREATE DATABASE "{admin_db}" OWNER "{role}"')
            await conn.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
            await conn.execute(
                f'ALTER ROLE "{role}" IN DATABASE "{admin_db}" '
                "SET default_transaction_read_only = off"
            )
        finally:
            await conn.close()

    async def owned_databases() -> list[str]:
        conn = await connect(pg_server.admin_dsn)
        try:
            return [
                row["datname"]
                for row in await conn.fetch(
                    "SELECT datname FROM pg_database WHERE datdba = "
                    "(SELECT oid FROM pg_roles WHERE rolname = $1)",
                    role,
                )
            ]
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await connect(pg_server.admin_dsn)
        try:
            for name in await owned_databases():
                await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await conn.execute(f'DROP ROLE "{role}"')
        finally:
            await conn.close()

    (tmp_path / "test_db.py").write_text(textwrap.dedent(A_DATABASE_TEST))
    asyncio.run(setup())
    try:
        parts = urlsplit(pg_server.dsn(admin_db))
        host = parts.netloc.rpartition("@")[2]
        dsn = urlunsplit(parts._replace(netloc=f"{role}:{role}@{host}"))
        done = _pytest(tmp_path, env={"CHUNKD_TEST_DSN": dsn})
        assert done.returncode == 1, done.stdout + done.stderr
        assert "the database is read-only" in done.stdout, done.stdout
        assert asyncio.run(owned_databases()) == [admin_db]
    finally:
        asyncio.run(teardown())


NO_SERVER = """
    import chunkd.testing.server as server
    from chunkd.demo.cluster import ClusterError


    class NoBinaries:
        def __init__(self, **options):
            raise ClusterError("no PostgreSQL server binaries found: install them")


    server.PostgresCluster = NoBinaries
    server._docker_server = lambda: None
"""


@pytest.mark.parametrize("ci", [False, True])
def test_no_postgresql_is_one_line_a_skip_or_under_ci_a_failure(tmp_path: Path, ci: bool) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(NO_SERVER))
    (tmp_path / "test_db.py").write_text("def test_db(chunkd_dsn):\n    pass\n")
    done = _pytest(tmp_path, "-ra", env={"CI": "1"} if ci else {})
    line = (
        "no PostgreSQL for the tests: CHUNKD_TEST_DSN is not set; no PostgreSQL server binaries "
        "found: install them; and no Docker engine answered (pip install 'chunkd[docker]' to "
        "use one)"
    )
    if ci:
        assert done.returncode == 1
        assert f"ERROR test_db.py::test_db - Failed: {line}" in done.stdout, done.stdout
        assert done.stdout.count(line) == 2  # the error, and its summary line
    else:
        assert done.returncode == 0, done.stdout
        assert f"SKIPPED [1] test_db.py:1: {line}" in done.stdout, done.stdout


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output and "connection.py" not in output, output
    assert "server.py" not in output, output


def test_an_unreachable_chunkd_test_dsn_is_one_line_and_a_failure(tmp_path: Path) -> None:
    """A ``CHUNKD_TEST_DSN`` that answers nothing (a socket directory without a server): one
    line with the reason, the password in none of it; a failure, not a skip, even outside CI,
    since that server was asked for by name."""
    (tmp_path / "test_db.py").write_text("def test_db(chunkd_dsn):\n    pass\n")
    dsn = f"postgresql://postgres:Unseen-Pw-3@/postgres?host={tmp_path}&port=5499"
    done = _pytest(tmp_path, env={"CHUNKD_TEST_DSN": dsn})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ERROR test_db.py::test_db - Failed: CHUNKD_TEST_DSN" in done.stdout, done.stdout
    [line] = [line for line in done.stdout.splitlines() if line.startswith("CHUNKD_TEST_DSN")]
    start = "CHUNKD_TEST_DSN cannot be used for the tests: cannot connect to postgresql://"
    assert line.startswith(start) and "No such file or directory" in line, line
    assert "Unseen-Pw-3" not in done.stdout + done.stderr
    _no_traceback(done.stdout + done.stderr)


def test_a_chunkd_test_dsn_role_that_cannot_create_databases_is_one_line(
    pg_server: TestServer, tmp_path: Path
) -> None:
    role = f"chunkd_nocreate_{uuid.uuid4().hex[:8]}"

    async def role_sql(statement: str) -> None:
        conn = await connect(pg_server.admin_dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    (tmp_path / "test_db.py").write_text("def test_db(chunkd_dsn):\n    pass\n")
    asyncio.run(role_sql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}'"))
    try:
        dsn = _conninfo(pg_server.admin_dsn, user=role, password=role)
        done = _pytest(tmp_path, env={"CHUNKD_TEST_DSN": dsn})
    finally:
        asyncio.run(role_sql(f'DROP ROLE "{role}"'))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ERROR test_db.py::test_db - Failed: CHUNKD_TEST_DSN" in done.stdout, done.stdout
    line = (
        "CHUNKD_TEST_DSN cannot be used for the tests: "
        "permission denied to create database (its role needs CREATEDB)"
    )
    assert line in done.stdout.splitlines(), done.stdout
    _no_traceback(done.stdout + done.stderr)
