"""What bench/soak.py prints and writes besides the samples: the progress line of each
sample, the run's header object, the summary table and the checks."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from soak_checks import LATE_S, Check, Plan, Sample, span
from soak_ledger import Histogram

BENCH_DIR = Path(__file__).resolve().parent


def say(text: str = "") -> None:
    print(text, flush=True)


def _ms(value: float | None) -> str:
    return f"{value:8.2f}" if value is not None else "       -"


def progress(s: Sample, behind_s: float) -> str:
    """One sample, as the run goes (``behind_s``: how far the producer is behind schedule)."""
    late = f"  producer {behind_s:.0f} s behind" if behind_s >= 1 else ""
    return (
        f"  {s.t:6.0f} s  enq {s.created / s.window_s:8,.0f}/s  done"
        f" {s.completed / s.window_s:8,.0f}/s  claim ms {_ms(s.latency.quantile(0.5))} /"
        f" {_ms(s.latency.quantile(0.99))}  {s.size / 2**20:8,.1f} MiB  dead {s.dead:10,}"
        f"  xmin age {s.xmin_age:9,}  expired {s.expired}" + ("  [held]" if s.held else "") + late
    )


def config(args: argparse.Namespace, rate: float, plan: Plan, mode: str) -> dict[str, Any]:
    """The first line of the JSON-lines file: what was run, where."""
    commit = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "kind": "config",
        "commit": commit,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "capacity_per_s": args.capacity,
        "capacity_measured": getattr(args, "capacity_measured", False),
        "rate_per_s": rate,
        "daemons": args.daemons,
        "concurrency": args.concurrency,
        "handler": args.handler,
        "chunks_per_job": args.chunks_per_job,
        "retention": mode,
        "plan": plan.__dict__,
        "mechanism_only": args.mechanism_only,
    }


def header(args: argparse.Namespace, plan: Plan, server: Any, retention_note: str) -> None:
    """What is about to run, on what."""
    say(
        f"soak: PostgreSQL {server['v']}, fsync {server['fsync']}, autovacuum_naptime"
        f" {server['naptime']}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    if args.capacity is None:
        capacity = "not measured (--rate given)"
    else:
        measured = "measured" if getattr(args, "capacity_measured", False) else "given"
        capacity = f"{args.capacity:,.0f} chunks/s ({measured})"
    say(
        f"soak: capacity {capacity}; offered {plan.rate:,.0f}/s"
        f" for {span(plan.duration)}; {args.daemons} daemons x {args.concurrency}, handler"
        f" {args.handler}, {args.chunks_per_job} chunk(s) a job"
    )
    say(f"soak: retention {span(plan.retention_s)}: {retention_note}")
    say(
        f"soak: snapshot held {plan.hold_start:g}-{plan.hold_end:g} s; warm-up"
        f" {span(plan.warmup)}; spans of {span(plan.span)} compared"
    )


def summary(plan: Plan, samples: list[Sample]) -> None:
    """Rows of about a twelfth of the run (at least a minute) up to the producer's stop."""
    step = max(60.0, plan.interval * round(plan.duration / 12 / plan.interval))
    say(
        f"{'from - to s':>13}  {'done/s':>8}  {'claim p50 / p99 ms':>19}  {'MiB':>8}"
        f"  {'dead max':>10}  {'xmin age max':>12}"
    )
    running = [s for s in samples if s.t <= plan.duration + LATE_S]
    edge = 0.0
    while edge < plan.duration:
        part = [s for s in running if edge <= s.t0 < edge + step]
        edge += step
        if not part:
            continue
        pooled = Histogram.pooled(s.latency for s in part)
        rate = sum(s.completed for s in part) / sum(s.window_s for s in part)
        say(
            f"{part[0].t0:6.0f} -{part[-1].t:6.0f}  {rate:8,.0f}  {_ms(pooled.quantile(0.5))} /"
            f" {_ms(pooled.quantile(0.99))}  {part[-1].size / 2**20:8,.1f}"
            f"  {max(s.dead for s in part):10,}  {max(s.xmin_age for s in part):12,}"
            + ("  held" if any(s.held for s in part) else "")
        )


def report(
    plan: Plan,
    rate: float,
    args: argparse.Namespace,
    mode: str,
    samples: list[Sample],
    checks: list[Check],
    goals: list[Check],
    path: Path,
) -> None:
    """The summary table, every check with its value, and where the samples are."""
    say("")
    say(
        f"chunkd soak: {span(plan.duration)} at {rate:,.0f} chunks/s offered"
        f" ({rate / args.capacity:.0%} of {args.capacity:,.0f}/s), snapshot held"
        f" {span(plan.hold_s)}, retention {span(plan.retention_s)} ({mode}), fsync on"
    )
    summary(plan, samples)
    width = max(len(c.name) for c in checks + goals) + 2
    say("")
    for c in checks:
        say(f"{c.name.ljust(width, '.')} {c.value}  {'PASS' if c.ok else 'FAIL'}")
    if args.mechanism_only:
        say("targets (issue 25), not judged (--short / --mechanism-only):")
    else:
        say("targets (issue 25):")
    for c in goals:
        verdict = "PASS" if c.ok else "FAIL"
        if args.mechanism_only:
            verdict = "met" if c.ok else "not met"
        say(f"{c.name.ljust(width, '.')} {c.value}  {verdict}")
    say(f"samples: {path}")
    say(f"load average at the end: {os.getloadavg()[0]:.2f}")
