"""chunkd and Procrastinate through the long-horizon harness of
hardbyte/postgresql-job-queue-benchmarking, natively: clean, idle-in-transaction and chaos
phases for both systems in one run.

    python bench/harness_run.py --harness-src DIR            # the full run, about 2 hours
    python bench/harness_run.py --harness-src DIR --short    # a smoke run, about 8 minutes

``DIR`` is a checkout of the harness (tested at commit 93677ca; it is never copied into this
repository). This script makes two virtualenvs under ``--work-dir`` with a Python >= 3.12:
the harness's, with its pinned dependencies (from its uv.lock), and one for its upstream
Procrastinate adapter (its procrastinate-bench/pyproject.toml pins); the chunkd adapter
runs on this Python (chunkd's). Then it runs the harness through
bench/harness_adapter/native_harness.py (a throwaway PostgreSQL cluster instead of its
Docker Compose one, the adapters launched natively) and prints a short table from the run's
summary.json; the harness's own outputs (raw.csv, summary.json, plots, index.html) are under
``DIR/results/<run-id>/``.

Phases, per system, each system on a fresh cluster: warmup, clean, idle-in-tx (a
transaction holding an XID pins the xmin horizon), recovery, then each chaos phase followed
by a clean phase to recover in: kill-worker + start-worker, repeated-kill,
postgres-restart, pg-backend-kill, pool-exhaustion. The table gives, per phase, the median
of the 5 s samples (completions/s, enqueues/s, pickup p50/p99), the peak dead tuples of the
system's tables, and after each chaos span the harness's jobs_lost estimate and time back
to 90% of the clean throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "harness_adapter" / "native_harness.py"
HARNESS_DEPS = ("psycopg", "psycopg-binary", "matplotlib", "pandas", "numpy", "pydantic")
CHAOS = (
    ("kill", "kill-worker(instance=0)"),
    ("restart", "start-worker(instance=0)"),
    ("after_kill", "clean"),
    ("repeated", "repeated-kill(instance=0,period={period})"),
    ("after_repeated", "clean"),
    ("pg_restart", "postgres-restart"),
    ("after_pg_restart", "clean"),
    ("backend_kills", "pg-backend-kill(rate=2)"),
    ("after_backend_kills", "clean"),
    ("exhaustion", "pool-exhaustion(idle_conns=300)"),
    ("after_exhaustion", "clean"),
)


def find_python(explicit: str | None) -> str:
    """A Python >= 3.12 (the harness's requires-python): --python, else on PATH, else pyenv's."""
    if explicit:
        candidates = [explicit]
    else:
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
        installed = sorted(pyenv.glob("3.1[2-9]*/bin/python3"), reverse=True)
        candidates = ["python3.13", "python3.12", "python3", *map(str, installed)]
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        check = "import sys; sys.exit(sys.version_info < (3, 12))"
        if subprocess.run([path, "-c", check], check=False, capture_output=True).returncode == 0:
            return path
    raise SystemExit(
        f"--python {explicit}: not found or older than 3.12"
        if explicit
        else "no Python >= 3.12 found (the harness requires it): pass --python PATH"
    )


def venv(path: Path, python: str, requirements: list[str]) -> str:
    """A virtualenv at ``path`` holding ``requirements``; its python."""
    bin_python = path / "bin" / "python"
    if not bin_python.exists():
        subprocess.run([python, "-m", "venv", str(path)], check=True)
    pip = [str(bin_python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)
    return str(bin_python)


def harness_requirements(src: Path) -> list[str]:
    """The harness's runtime dependencies at the versions its uv.lock pins."""
    lock = tomllib.loads((src / "uv.lock").read_text())
    pinned = {p["name"]: p["version"] for p in lock["package"] if p["name"] in HARNESS_DEPS}
    missing = set(HARNESS_DEPS) - set(pinned)
    if missing:
        raise SystemExit(f"{src / 'uv.lock'}: no pin for {sorted(missing)}")
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


def procrastinate_requirements(src: Path) -> list[str]:
    project = tomllib.loads((src / "procrastinate-bench" / "pyproject.toml").read_text())
    return list(project["project"]["dependencies"])


def phases(args: argparse.Namespace) -> list[str]:
    specs = [
        f"warmup=warmup:{args.warmup}",
        f"clean_1=clean:{args.clean}",
        f"idle_1=idle-in-tx:{args.idle}",
        f"recovery_1=recovery:{args.recovery}",
    ]
    for label, kind in CHAOS:
        duration = args.chaos_recovery if kind == "clean" else args.chaos
        specs.append(f"{label}={kind.format(period=args.kill_period)}:{duration}")
    return specs


def _metric(block: dict[str, Any], name: str) -> float | None:
    value = block.get("metrics", {}).get(name, {})
    return value.get("median") if isinstance(value, dict) else None


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    """One markdown table: a row per system and phase."""
    lines = [
        "| system | phase | type | done/s | enqueued/s | pickup p50 / p99 ms "
        "| peak dead tuples | jobs lost | back to 90% |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, body in summary.get("systems", {}).items():
        for phase in summary.get("phases", []):
            block = body.get("phases", {}).get(phase["label"])
            if block is None:
                continue
            p50, p99 = _metric(block, "claim_p50_ms"), _metric(block, "claim_p99_ms")
            lost = block.get("jobs_lost")
            back = block.get("chaos_recovery_time_s")
            chaos_span = "jobs_lost" in block
            back_text = "not reached" if back is None else f"{back:.0f} s"
            lines.append(
                f"| {system} | {phase['label']} | {phase['type']} "
                f"| {_fmt(_metric(block, 'completion_rate'))} "
                f"| {_fmt(_metric(block, 'enqueue_rate'))} "
                f"| {_fmt(p50, '.1f')} / {_fmt(p99, '.1f')} "
                f"| {_fmt(block.get('peak_dead_tup'))} "
                f"| {_fmt(lost) if chaos_span else ''} "
                f"| {back_text if chaos_span else ''} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--harness-src",
        type=Path,
        default=os.environ.get("CHUNKD_HARNESS_SRC"),
        help="checkout of hardbyte/postgresql-job-queue-benchmarking [env: CHUNKD_HARNESS_SRC]",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/chunkd-harness"))
    parser.add_argument("--python", help="a Python >= 3.12 for the harness (default: found)")
    parser.add_argument("--systems", default="chunkd,procrastinate")
    parser.add_argument("--short", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--producer-rate", type=int, default=200, help="jobs/s (default 200)")
    parser.add_argument("--worker-count", type=int, default=8, help="concurrency (default 8)")
    for name, full, short in (
        ("warmup", "5m", "10s"),
        ("clean", "15m", "20s"),
        ("idle", "15m", "20s"),
        ("recovery", "10m", "20s"),
        ("chaos", "60s", "10s"),
        ("chaos-recovery", "2m", "15s"),
        ("kill-period", "20s", "4s"),
    ):
        parser.add_argument(f"--{name}", help=f"duration (default {full}; --short: {short})")
        parser.set_defaults(**{f"_{name.replace('-', '_')}": (full, short)})
    parser.add_argument("--sample-every", type=int, help="seconds (default 5; --short: 2)")
    args = parser.parse_args()
    if args.harness_src is None or not (args.harness_src / "bench_harness").is_dir():
        parser.error(
            "--harness-src must be a checkout of hardbyte/postgresql-job-queue-benchmarking "
            f"(got {args.harness_src}); e.g. git clone "
            "https://github.com/hardbyte/postgresql-job-queue-benchmarking"
        )
    for name in ("warmup", "clean", "idle", "recovery", "chaos", "chaos_recovery", "kill_period"):
        full, short = getattr(args, f"_{name}")
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    sample_every = args.sample_every or (2 if args.short else 5)
    src = args.harness_src.resolve()

    python = find_python(args.python)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"harness venv and procrastinate venv under {args.work_dir} ({python})", file=sys.stderr)
    harness_py = venv(args.work_dir / "harness-venv", python, harness_requirements(src))
    procrastinate_py = venv(
        args.work_dir / "procrastinate-venv", python, procrastinate_requirements(src)
    )
    results = src / "results"
    before = set(results.iterdir()) if results.is_dir() else set()
    command = [
        harness_py,
        str(NATIVE),
        "--harness-src",
        str(src),
        "--chunkd-python",
        sys.executable,
        "--procrastinate-python",
        procrastinate_py,
        "--",
        "run",
        "--systems",
        args.systems,
        "--skip-build",
        "--producer-rate",
        str(args.producer_rate),
        "--worker-count",
        str(args.worker_count),
        "--sample-every",
        str(sample_every),
    ]
    for spec in phases(args):
        command += ["--phase", spec]
    started = time.monotonic()
    code = subprocess.run(command, check=False).returncode
    new = sorted(set(results.iterdir()) - before) if results.is_dir() else []
    if code != 0 or not new:
        print(f"the harness exited {code}", file=sys.stderr)
        return code or 1
    run_dir = new[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    rendered = table(summary)
    (run_dir / "chunkd-table.md").write_text(rendered + "\n")
    print(
        f"\n{run_dir.name}: {args.systems}, {args.producer_rate} jobs/s offered, "
        f"{args.worker_count} workers, {time.monotonic() - started:.0f} s\n"
    )
    print(rendered)
    print(f"\nthe harness's outputs: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
