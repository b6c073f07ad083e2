"""``tests/run.sh`` refuses a Python older than 3.11 in one line, before it installs anything.

The script runs from a copy in a directory of the test's own, so nothing it could do after the
check (apt-get, a virtualenv, pytest) would touch the checkout; it must stop at the check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN_SH = Path(__file__).resolve().parent / "run.sh"
OLD_PYTHON = (
    "#!/bin/sh\n# Answers like Python 3.10 does to the version check.\necho 3.10.12\nexit 1\n"
)


@pytest.mark.parametrize("python", ["old", "missing"])
def test_run_sh_needs_python_3_11_and_says_so_in_one_line(tmp_path: Path, python: str) -> None:
    (tmp_path / "tests").mkdir()
    script = tmp_path / "tests" / "run.sh"
    shutil.copy(RUN_SH, script)
    if python == "old":
        interpreter = tmp_path / "python3.10"
        interpreter.write_text(OLD_PYTHON)
        interpreter.chmod(0o755)
        found = "3.10.12"
    else:
        interpreter = tmp_path / "no-such-python"
        found = "not found"
    result = subprocess.run(
        ["bash", str(script)],
        env={"PATH": os.environ["PATH"], "PYTHON": str(interpreter)},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"tests/run.sh: chunkd needs Python 3.11 or newer, and {interpreter} is {found}: "
        "run it with a newer one, e.g. PYTHON=python3.12 bash tests/run.sh\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["tests", *([interpreter.name] if python == "old" else [])]
    ), "nothing was created or installed"
