"""The release, as a user gets it: the sdist and the wheel built with ``python -m build`` (the
wheel from the sdist, so the sdist is shown complete), both passing ``twine check --strict``,
and the wheel installed into a fresh virtualenv (dependencies from the package index) and run
from outside the checkout, so the SQL it applies can only come from inside the wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from chunkd import __version__

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = len(list((ROOT / "sql" / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(
    command: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _clean_env(bin_dir: Path) -> dict[str, str]:
    """This environment minus anything that could point back at the checkout or its venv."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("CHUNKD_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    return env


def _check_sdist(sdist: Path) -> None:
    """The sdist holds what a release's users and packagers need, and nothing of a checkout's
    own state (a virtualenv, caches, a built site, test artifacts)."""
    top = f"chunkd-{__version__}/"
    with tarfile.open(sdist) as archive:
        names = {n.removeprefix(top) for n in archive.getnames()}
    wanted = {
        "pyproject.toml", "README.md", "CHANGELOG.md", "mkdocs.yml", "tests/run.sh",
        "daemon/chunkd/__init__.py", "daemon/chunkd/py.typed", "docs/deploy.md",
        "systemd/chunkd.service", "systemd/chunkd@.service", "systemd/chunkd-web.service",
        "systemd/chunkd.env.example", "systemd/chunkd-web.env.example",
        *(f"sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")),
    }  # fmt: skip
    assert wanted <= names, sorted(wanted - names)
    unwanted = [
        n for n in names
        if n.startswith((".venv/", "site/", "dist/", "tests/artifacts/")) or "__pycache__" in n
    ]  # fmt: skip
    assert not unwanted, unwanted


def test_the_release_builds_checks_installs_and_runs_from_a_fresh_venv(
    empty_database: str, tmp_path: Path
) -> None:
    # Build: exactly the command a release uses (docs/development.md), into a directory of
    # this test's own: the sdist, then the wheel from the sdist.
    dist = tmp_path / "dist"
    built = _run([sys.executable, "-m", "build", "--outdir", str(dist)], cwd=ROOT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert sorted(p.name for p in dist.iterdir()) == [
        f"chunkd-{__version__}-py3-none-any.whl",
        f"chunkd-{__version__}.tar.gz",
    ]
    wheel = dist / f"chunkd-{__version__}-py3-none-any.whl"
    _check_sdist(dist / f"chunkd-{__version__}.tar.gz")
    # The metadata a package index would show (README as the description, rendered).
    checked = _run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(dist.iterdir()))],
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"chunkd/sql/migrations/0001_queue.sql", "chunkd/sql/queries.sql"} <= names
    shipped_sql = {
        f"chunkd/sql/{p.relative_to(ROOT / 'sql')}"
        for p in (ROOT / "sql").rglob("*")
        if p.suffix in (".sql", ".txt")
    }
    assert shipped_sql <= names, shipped_sql - names
    web_files = {
        f"chunkd/{p.relative_to(ROOT / 'daemon' / 'chunkd').as_posix()}"
        for p in (ROOT / "daemon" / "chunkd" / "web").rglob("*")
        if p.suffix in (".html", ".css", ".js")
    }
    assert "chunkd/web/templates/base.html" in web_files
    assert web_files <= names, web_files - names
    assert not any(n.startswith(("tests/", "docs/", "bench/")) for n in names)
    # The client is typed for the applications that call it (PEP 561).
    assert {"chunkd/py.typed", "chunkd/client/__init__.py", "chunkd/client/sync.py"} <= names

    # Install into a fresh venv, away from the checkout.
    home = tmp_path / "user"
    home.mkdir()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    env = _clean_env(bin_dir)
    installed = _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
        cwd=home,
        env=env,
        timeout_s=600,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    # The installed package, and the SQL it reads, live in the venv, not in the checkout.
    where = _run(
        [
            str(bin_dir / "python"),
            "-c",
            "import chunkd, chunkd.db.sql_files as s; print(chunkd.__file__); print(s.sql_dir())",
        ],
        cwd=home,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    package_file, sql_dir = (Path(line) for line in where.stdout.splitlines())
    for path in (package_file, sql_dir):
        assert path.resolve().is_relative_to(env_dir.resolve()), path
    assert sql_dir.name == "sql" and (sql_dir / "migrations" / "0001_queue.sql").is_file()

    chunkd = str(bin_dir / "chunkd")
    env["CHUNKD_DSN"] = empty_database

    behind = _run([chunkd, "migrate", "--check"], cwd=home, env=env, timeout_s=60)
    assert behind.returncode == 1, behind.stdout + behind.stderr
    # Behind: no schema at all yet. One line on stderr, naming the fix.
    assert behind.stderr == "chunkd: error: database has no chunkd schema: run `chunkd migrate`\n"

    migrated = _run([chunkd, "migrate"], cwd=home, env=env, timeout_s=60)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "applied migration(s) 1" in migrated.stdout

    current = _run([chunkd, "migrate", "--check"], cwd=home, env=env, timeout_s=60)
    assert current.returncode == 0, current.stdout + current.stderr
    assert current.stdout == f"chunkd schema is current (version {MIGRATIONS})\n", current.stdout

    # chunkd web serves its templates and static files from the installed package.
    serve_once = (
        "import subprocess, sys, time, json, urllib.request\n"
        "p = subprocess.Popen([sys.argv[1], '--log-format', 'json', 'web', '--port', '0'],"
        " stdout=subprocess.PIPE, text=True)\n"
        "try:\n"
        "    for line in p.stdout:\n"
        "        if 'web.listening' in line:\n"
        "            url = json.loads(line)['url']; break\n"
        "    for path in ('jobs', 'static/app.js'):\n"
        "        print(path, urllib.request.urlopen(url + path, timeout=10).status)\n"
        "finally:\n"
        "    p.terminate(); p.wait(20)\n"
    )
    served = _run([str(bin_dir / "python"), "-c", serve_once, chunkd], cwd=home, env=env)
    assert served.returncode == 0, served.stdout + served.stderr
    assert served.stdout.splitlines() == ["jobs 200", "static/app.js 200"], served.stdout

    del env["CHUNKD_DSN"]  # the demo brings its own PostgreSQL
    demo = _run([chunkd, "demo", "--chunks", "30"], cwd=home, env=env, timeout_s=180)
    output = demo.stdout + demo.stderr
    kept = re.search(r"the daemon's log is kept: (\S+)", output)
    if kept:
        Path(kept[1]).unlink(missing_ok=True)
    assert demo.returncode == 0, output[-6000:]
    assert "SELECT * FROM chunkd.chunk_processing_status" in output
    assert "removed the throwaway PostgreSQL" in output and kept, output[-3000:]
