"""The soak's verdicts (bench/soak.py): the mechanism checks every run must pass, and the
targets of issue 25, judged only on a full run.

Windows are the spans between two samples' snapshots; a window belongs to a phase when it
lies wholly inside it (warm-up excluded everywhere, the drain after the producer stops too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soak_ledger import CLAIMED, COMPLETED, CREATED, Histogram, Ledger

RATE_TOLERANCE = 0.02  # completion rate within 2 % of the offered rate
P99_FACTOR = 1.2  # p99 at the end, and after the held snapshot, within 1.2x the start's
RECOVERY_LIMIT_S = 120.0  # ... within 2 minutes of the snapshot's release
SIZE_TOLERANCE = 0.20  # total size flat within 20 % after the first retention windows


@dataclass
class Plan:
    """What the run was asked to do (seconds from the soak's start, database clock)."""

    rate: float
    duration: float
    warmup: float
    hold_start: float
    hold_s: float
    retention_s: float
    expiry_slack_s: float
    interval: float
    span: float
    recovery_span: float
    dead_bound: int
    dead_settle_s: float

    @property
    def hold_end(self) -> float:
        return self.hold_start + self.hold_s

    @property
    def size_from(self) -> float:
        """The first retention windows have passed: warm-up, two retention periods, slack."""
        return self.warmup + 2 * self.retention_s + self.expiry_slack_s


@dataclass
class Sample:
    """One sample: the window (t0, t] it closes, what was first seen in it, and the state."""

    t0: float
    t: float
    created: int
    completed: int
    latency: Histogram
    tables: dict[str, dict[str, int]]
    xmin_age: int
    expired: int
    held: bool

    @property
    def window_s(self) -> float:
        return self.t - self.t0

    @property
    def size(self) -> int:
        return sum(v["table"] + v["indexes"] for v in self.tables.values())

    @property
    def dead(self) -> int:
        return sum(v["dead"] for v in self.tables.values())


@dataclass
class Check:
    name: str
    value: str
    ok: bool | None  # None: a figure, not judged
    target: bool = False  # a target of the issue (judged on full runs only)


@dataclass
class Facts:
    """Everything else the verdicts need, gathered by the run."""

    enqueued: int  # chunks the producer committed (numbers 0 .. enqueued-1)
    scheduled: int  # chunks its schedule called for
    enqueue_errors: list[str]
    producer_lag_s: float
    retention_mode: str  # "retention" or "stand-in purge"
    jobs_enqueued: int
    leftovers: dict[str, int]
    final_expired: int
    holder: dict[str, Any]
    daemon_exits: list[str]
    drained: bool
    extra: dict[str, Any] = field(default_factory=dict)


# A window "ends" at a phase's end when its snapshot came at most this long after it (a sample
# is taken when its interval is up: its snapshot follows by the time a connection takes).
LATE_S = 0.5


def span(seconds: float) -> str:
    """``90 s``, ``10 min``."""
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:.0f} s"


def _between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if s.t0 >= start - LATE_S and s.t <= end + LATE_S]


def _p99(samples: list[Sample]) -> float | None:
    return Histogram.pooled(s.latency for s in samples).quantile(0.99)


def _fmt_ms(value: float | None) -> str:
    return "none" if value is None else f"{value:,.2f} ms"


def mechanism(plan: Plan, samples: list[Sample], ledger: Ledger, facts: Facts) -> list[Check]:
    """Checks of the mechanism: sampling, the held snapshot, retention, nothing lost."""
    checks: list[Check] = []
    running = [s for s in samples if s.t <= plan.duration + LATE_S]
    gaps = [s.window_s for s in running]
    want = int(plan.duration // plan.interval) - 1
    with_stats = sum(1 for s in running if s.tables and any(v["live"] for v in s.tables.values()))
    checks.append(
        Check(
            f"samples every {plan.interval:g} s (sizes, dead tuples, latency)",
            f"{len(running)} (want >= {want}), longest gap {max(gaps, default=0):.1f} s,"
            f" {with_stats} with table figures",
            len(running) >= want
            and max(gaps, default=0) <= 2.5 * plan.interval
            and with_stats >= want,
        )
    )
    latencies = sum(s.latency.count for s in samples)
    claimed = ledger.count(facts.enqueued, CLAIMED)
    with_latency = sum(1 for s in samples if s.latency.count)
    checks.append(
        Check(
            "claim latency read for every chunk claimed",
            f"{latencies:,} latencies, {claimed:,} chunks claimed, in {with_latency} windows",
            latencies == claimed and with_latency > 0,
        )
    )
    checks.append(
        Check(
            "producer kept its schedule (open loop)",
            f"{facts.enqueued:,} of {facts.scheduled:,} chunks, at worst"
            f" {facts.producer_lag_s:.2f} s behind, {len(facts.enqueue_errors)} enqueue errors",
            facts.enqueued == facts.scheduled and not facts.enqueue_errors,
        )
    )
    checks.append(
        Check(
            "daemons alive until the end",
            ", ".join(facts.daemon_exits) or "all",
            not facts.daemon_exits,
        )
    )
    held = facts.holder
    in_hold = [s for s in samples if s.held]
    ages = [s.xmin_age for s in in_hold]
    checks.append(
        Check(
            "snapshot held idle in transaction",
            f"{held.get('held_s', 0):.0f} s (asked {plan.hold_s:g}), xmin {held.get('xmin')}"
            f" -> {held.get('xmin_after')}, state {held.get('state_after')!r},"
            f" {len(in_hold)} samples inside, xmin age {min(ages, default=0):,}"
            f" -> {max(ages, default=0):,}",
            held.get("xmin") is not None
            and held.get("xmin") == held.get("xmin_after")
            and held.get("state_after") == "idle in transaction"
            and held.get("held_s", 0) >= plan.hold_s - 1
            and len(in_hold) >= 2
            and max(ages, default=0) > min(ages, default=0),
        )
    )
    removed = facts.jobs_enqueued - facts.leftovers["jobs"]
    expired_max = max((s.expired for s in samples), default=0)
    checks.append(
        Check(
            f"expired jobs gone ({facts.retention_mode})",
            f"{removed:,} of {facts.jobs_enqueued:,} jobs removed; finished more than"
            f" {plan.retention_s + plan.expiry_slack_s:g} s ago and still there: at most"
            f" {expired_max} in a sample, {facts.final_expired} at the end;"
            f" {facts.leftovers['orphan_attempts']} attempts without their job",
            removed > 0
            and expired_max == 0
            and facts.final_expired == 0
            and facts.leftovers["orphan_attempts"] == 0,
        )
    )
    enq = facts.enqueued
    created, claimed, completed = (ledger.count(enq, f) for f in (CREATED, CLAIMED, COMPLETED))
    missing = ledger.missing(enq, COMPLETED)
    checks.append(
        Check(
            "nothing lost: every enqueued chunk seen enqueued, claimed, completed",
            f"{enq:,} enqueued; seen {created:,} / {claimed:,} / {completed:,}"
            + (f"; first missing {missing[:5]}" if missing else "")
            + ("" if facts.drained else "; NOT drained"),
            created == claimed == completed == enq and facts.drained,
        )
    )
    left = facts.leftovers
    checks.append(
        Check(
            "none duplicated, none stray",
            f"{len(ledger.duplicates)} completed twice, {ledger.beyond(enq)} never enqueued,"
            f" {ledger.foreign} without a number; {left['unfinished']} jobs unfinished,"
            f" {left['not_completed']} not wholly completed",
            not ledger.duplicates
            and not ledger.beyond(enq)
            and not ledger.foreign
            and not left["unfinished"]
            and not left["not_completed"],
        )
    )
    return checks


def targets(plan: Plan, samples: list[Sample]) -> list[Check]:
    """The issue's targets, each with its measured value."""
    checks: list[Check] = []
    steady = _between(samples, plan.warmup, plan.duration)
    worst = max(steady, key=lambda s: abs(s.completed / s.window_s / plan.rate - 1), default=None)
    off = [s for s in steady if abs(s.completed / s.window_s / plan.rate - 1) > RATE_TOLERANCE]
    held = [s for s in steady if s.held]
    held_rate = sum(s.completed for s in held) / max(sum(s.window_s for s in held), 1e-9)
    checks.append(
        Check(
            f"completion rate = offered {plan.rate:,.0f}/s within 2 % in every window",
            (
                f"{len(off)} of {len(steady)} windows outside; worst"
                f" {worst.completed / worst.window_s:,.0f}/s at {worst.t:.0f} s;"
                f" during the hold {held_rate:,.0f}/s"
                if worst
                else "no windows"
            ),
            bool(steady) and not off,
            target=True,
        )
    )
    first = _p99(_between(samples, plan.warmup, plan.warmup + plan.span))
    last = _p99(_between(samples, plan.duration - plan.span, plan.duration))
    checks.append(
        Check(
            f"claim p99, last {span(plan.span)} <= 1.2x first {span(plan.span)} after warm-up",
            f"{_fmt_ms(last)} vs {_fmt_ms(first)}"
            + (f" ({last / first:.2f}x)" if first and last else ""),
            bool(first and last and last <= P99_FACTOR * first),
            target=True,
        )
    )
    recovery = _recovery_s(plan, samples, first)
    checks.append(
        Check(
            "claim p99 back within 1.2x within 2 min of the release",
            (
                f"after {recovery:.0f} s (a {plan.recovery_span:g} s span's p99"
                f" <= {_fmt_ms(P99_FACTOR * first if first else None)})"
                if recovery is not None
                else "not back before the end"
            ),
            recovery is not None and recovery <= RECOVERY_LIMIT_S,
            target=True,
        )
    )
    checks.append(_size_check(plan, samples))
    checks.append(_dead_check(plan, samples))
    return checks


def _recovery_s(plan: Plan, samples: list[Sample], first: float | None) -> float | None:
    """Seconds from the release to the start of the first span of ``recovery_span`` whose
    pooled p99 is within 1.2x the first span's."""
    if first is None:
        return None
    after = [s for s in samples if s.t0 >= plan.hold_end - LATE_S and s.t <= plan.duration + LATE_S]
    for i, start in enumerate(after):
        part = [s for s in after[i:] if s.t <= start.t0 + plan.recovery_span + LATE_S]
        if part[-1].t < start.t0 + plan.recovery_span - LATE_S:
            return None  # not a whole span left before the end
        p99 = _p99(part)
        if p99 is not None and p99 <= P99_FACTOR * first:
            return start.t0 - plan.hold_end
    return None


def _size_check(plan: Plan, samples: list[Sample]) -> Check:
    after = [s for s in samples if plan.size_from <= s.t <= plan.duration + LATE_S]
    name = f"total size flat within 20 % from {span(plan.size_from)}"
    if not after:
        return Check(name, "no samples after the first retention windows", False, target=True)
    ref = after[0].size
    high = max(after, key=lambda s: s.size)
    low = min(after, key=lambda s: s.size)
    return Check(
        name,
        f"{ref / 2**20:,.1f} MiB at {after[0].t:.0f} s; {low.size / ref:.2f}x"
        f" - {high.size / ref:.2f}x (max {high.size / 2**20:,.1f} MiB at {high.t:.0f} s)",
        high.size <= (1 + SIZE_TOLERANCE) * ref and low.size >= (1 - SIZE_TOLERANCE) * ref,
        target=True,
    )


def _dead_check(plan: Plan, samples: list[Sample]) -> Check:
    """Dead tuples under the bound everywhere but the hold and ``dead_settle_s`` after it."""
    settled = [
        s
        for s in _between(samples, plan.warmup, plan.duration)
        if s.t <= plan.hold_start + LATE_S or s.t0 >= plan.hold_end + plan.dead_settle_s - LATE_S
    ]
    during = [s for s in samples if plan.hold_start < s.t < plan.hold_end + plan.dead_settle_s]
    peak = max(settled, key=lambda s: s.dead, default=None)
    peak_hold = max((s.dead for s in during), default=0)
    return Check(
        f"dead tuples <= {plan.dead_bound:,} outside the hold (+{span(plan.dead_settle_s)})",
        (
            f"max {peak.dead:,} at {peak.t:.0f} s; during the hold up to {peak_hold:,}"
            if peak
            else "no samples"
        ),
        peak is not None and peak.dead <= plan.dead_bound,
        target=True,
    )


def sample_line(plan: Plan, s: Sample, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON line of one sample (bench/results/soak-*.jsonl)."""
    phase = (
        "warmup"
        if s.t0 < plan.warmup
        else "drain"
        if s.t > plan.duration + 1e-6
        else "hold"
        if s.held
        else "steady"
    )
    return {
        "t_s": round(s.t, 3),
        "window_s": round(s.window_s, 3),
        "phase": phase,
        "enqueued_per_s": round(s.created / s.window_s, 1),
        "completed_per_s": round(s.completed / s.window_s, 1),
        "claim_ms": {
            "p50": s.latency.quantile(0.5),
            "p99": s.latency.quantile(0.99),
            "n": s.latency.count,
            "bins": dict(sorted(s.latency.bins.items())),
        },
        "size_bytes": s.size,
        "table_bytes": sum(v["table"] for v in s.tables.values()),
        "index_bytes": sum(v["indexes"] for v in s.tables.values()),
        "dead_tuples": s.dead,
        "live_tuples": sum(v["live"] for v in s.tables.values()),
        "xmin_age": s.xmin_age,
        "expired_jobs": s.expired,
        "tables": s.tables,
        **extra,
    }
