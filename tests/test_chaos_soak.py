"""The 60-second chaos soak (``bench/chaos.py``) as part of the suite: it must exit 0.

It runs its own throwaway cluster (fsync on) and daemons, so it needs no fixture; it is slow
(60 s of chaos plus convergence) but it is the proof of the central promise (no chunk lost or
completed twice while daemons are killed or frozen, connections cut, the database read-only
for a while and Postgres restarted), so it is never skipped. Its mixed workload (long jobs, a
stream of new ones, ``max_concurrency = 1`` jobs, a concurrency key) also proves the limits
and the fairness bound under the same chaos.
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
    print(report)  # the figures (pytest -rP shows them when the test passes)
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
        "most handlers running at once",
        "claims while another of the job was in flight",
        "out of seq order",
        "most claims in flight at once",
        "fair turns: waits longer than",
    ):
        assert any(line in out and out.endswith("OK") for out in report.splitlines()), line
    assert any(
        out.startswith("chaos: read-only windows / daemons frozen") and out.endswith(" 1 / 1")
        for out in report.splitlines()
    ), "the read-only window and the frozen daemon happened"
    assert "RESULT: PASS" in report
