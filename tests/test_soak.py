"""The sustained-load soak (``bench/soak.py``) as part of the suite: its short version, which
tests the mechanism, not the figures (those need the 60-minute run on a quiet machine:
docs/benchmarks.md).

``--short`` exercises every part of the soak at least once in about 90 s: the no-op capacity
measurement (5 s), the open-loop producer at 5 % of it for 60 s, a sample every 5 s (12),
a snapshot held idle in transaction for 20 s in the middle (3-4 samples inside it), and a
15 s retention (the schema's, or the stand-in purge) that removes jobs from 15 s on while
every chunk must still be accounted for. A longer run repeats the same code paths; only the
figures change. The issue's targets are printed but not judged here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
MECHANISM = (
    "samples every 5 s",
    "claim latency read for every chunk claimed",
    "producer kept its schedule",
    "daemons alive until the end",
    "snapshot held idle in transaction",
    "expired jobs gone",
    "nothing lost: every enqueued chunk seen enqueued, claimed, completed",
    "none duplicated, none stray",
)
TARGETS = (
    "completion rate = offered",
    "claim p99, last",
    "claim p99 back within 1.2x",
    "total size flat within 20 %",
    "dead tuples <=",
)


@pytest.mark.timeout(300)
def test_short_soak_exercises_the_whole_mechanism(tmp_path: Path) -> None:
    samples_file = tmp_path / "soak.jsonl"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--short", "--out", str(samples_file)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    lines = report.splitlines()
    for name in MECHANISM:
        found = [out for out in lines if out.startswith(name)]
        assert found and found[0].endswith("PASS"), (name, report)
    # The targets are printed with their values, not judged.
    assert "targets (issue 25), not judged" in report
    for name in TARGETS:
        found = [out for out in lines if out.startswith(name)]
        assert found and found[0].endswith(("met", "not met")), (name, report)
    # Retention is the schema's, or the stand-in, and the output says which.
    assert ("STAND-IN, chunkd.purge_finished_jobs" in report) != (
        "chunkd.set_retention('completed'" in report
    ), report
    assert "RESULT: PASS" in report

    records = [json.loads(line) for line in samples_file.read_text().splitlines()]
    config, samples, final = records[0], records[1:-1], records[-1]
    assert config["kind"] == "config" and config["capacity_measured"]
    assert final["kind"] == "result" and final["ok"]
    assert all(s["kind"] == "sample" for s in samples)
    assert len(samples) >= 11
    held = [s for s in samples if s["phase"] == "hold"]
    assert len(held) >= 2 and max(s["xmin_age"] for s in held) > min(s["xmin_age"] for s in held)
    for s in samples:
        assert s["size_bytes"] > 0 and s["dead_tuples"] >= 0
        assert {"chunkd.jobs", "chunkd.chunks", "chunkd.attempts", "chunkd.ready"} <= set(
            s["tables"]
        )
    steady = [s for s in samples if s["phase"] in ("steady", "hold")]
    assert steady and all(s["claim_ms"]["n"] > 0 and s["claim_ms"]["p99"] for s in steady)
    assert sum(s["completed_per_s"] * s["window_s"] for s in samples) == pytest.approx(
        sum(s["enqueued_per_s"] * s["window_s"] for s in samples), abs=len(samples)
    )
