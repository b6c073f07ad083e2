"""The package layout is the architecture: layers only import downward, modules stay small,
and the documented import paths keep working.

The layering contract lives in ``pyproject.toml`` (``[tool.importlinter]``); these tests run
``lint-imports`` on the real package, and once on a copy with an upward import planted, to
show that the contract really catches one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "daemon" / "chunkd"
MAX_MODULE_LINES = 400


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layers_are_kept() -> None:
    result = _lint_imports(ROOT, ROOT / "daemon")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The database layer importing the CLI must fail the check."""
    shutil.copytree(PACKAGE, tmp_path / "daemon" / "chunkd")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "daemon" / "chunkd" / "db" / "queue.py"
    planted.write_text(planted.read_text() + "\nfrom chunkd.cli import main  # noqa\n")
    result = _lint_imports(tmp_path, tmp_path / "daemon")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert "chunkd.db.queue -> chunkd.cli" in result.stdout


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it by what it owns"


def test_documented_import_paths() -> None:
    import chunkd
    from chunkd import Chunk, PermanentError, RetryLater, __version__
    from chunkd.cli import main
    from chunkd.handlers import ENTRY_POINT_GROUP

    assert {"Chunk", "PermanentError", "RetryLater"} <= set(chunkd.__all__)
    assert (Chunk, PermanentError, RetryLater) == (
        chunkd.Chunk,
        chunkd.PermanentError,
        chunkd.RetryLater,
    )
    assert __version__.count(".") == 2
    assert callable(main)
    assert ENTRY_POINT_GROUP == "chunkd.handlers"


@pytest.mark.parametrize("module", ["chunkd", "chunkd.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("chunkd, version ")
