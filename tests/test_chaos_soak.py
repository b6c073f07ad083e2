"""The 60-second chaos soak (``bench/chaos.py``) as part of the suite: it must exit 0.

It runs its own throwaway cluster (fsync on) and daemons, so it needs no fixture; it is slow
(60 s of chaos plus convergence) but it is the proof of the central promise (no chunk lost or
completed twice while daemons are killed or frozen, connections cut, the database read-only
for a while and Postgres restarted), so it is never skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parent.parent / "bench" / "chaos.py"


@pytest.mark.timeout(300)
def test_sixty_second_chaos_soak_loses_nothing_and_completes_nothing_twice() -> None:
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--duration", "60", "--kill-every", "2-5",
         "--chunks", "10000", "--converge-timeout", "120"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for line in (
        "chunks terminal",
        "lost (",
        "completed twice",
        "overlapped in time",
        "stuck processing under a renewed lease",
        "ran on after SIGCONT",
        "tasks that crashed",
        "continuation chain",
        "schedule every 5 s",
        "job_finished events",
    ):
        assert any(line in out and out.endswith("OK") for out in report.splitlines()), line
    assert any(
        out.startswith("chaos: read-only windows / daemons frozen") and out.endswith(" 1 / 1")
        for out in report.splitlines()
    ), "the read-only window and the frozen daemon happened"
    assert "RESULT: PASS" in report
