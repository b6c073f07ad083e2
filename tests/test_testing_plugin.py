"""The pytest plugin as an application uses it: pytest in a subprocess on examples/app-quickstart
(its tests are the acceptance of issue 23: drain, a chunk run twice, a lost lease, a kill),
``-p chunkd.testing`` without the entry point, and the one line when no PostgreSQL is there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
