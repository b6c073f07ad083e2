"""Sustained-load soak (issue 25): a fixed offered rate for an hour, a snapshot held in the
middle, retention keeping the tables flat; nothing may be lost.

    python bench/soak.py                  # 60 minutes; the figures of docs/benchmarks.md
    python bench/soak.py --duration 10m --hold 2m --retention 30s --warmup 1m
    python bench/soak.py --short          # 60 s of load: the mechanism (tests/test_soak.py)

A throwaway cluster (fsync on). First the no-op capacity of the setup (``--daemons`` ``chunkd
run`` x ``--concurrency``, one-chunk jobs, a producer keeping a backlog), unless ``--capacity``
or ``--rate`` is given; then, on a fresh database, the same daemons with a short handler
(``bench_handlers:sleep1``, 1 ms) and an open-loop producer offering ``--load`` (60 %) of
that capacity for ``--duration``. Retention: when the schema has ``chunkd.set_retention``,
``chunkd retention set completed|failed|cancelled RETENTION``; otherwise
``chunkd.purge_finished_jobs(RETENTION)`` every few seconds, a stand-in said so in the output.
From ``--hold-at`` (default: centred) a session holds ``BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT 1;`` idle in transaction for ``--hold``, then rolls back.

Every ``--interval`` a sample: chunks enqueued, claimed and completed for the first time since
the last sample (bench/soak_ledger.py), claim latency p50/p99 (enqueue-to-claim of first
attempts), table and index sizes and dead tuples of every chunkd table, the xmin horizon's
age, jobs past their retention. Samples go to bench/results/soak-*.jsonl, one JSON object a
line; a summary and the checks are printed. Exit 0 when every check holds (with ``--short``
or ``--mechanism-only`` the issue's targets are printed, not judged), 1 otherwise, 2 for a
usage or setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import soak_db  # noqa: E402
from soak_checks import Facts, Plan, Sample, mechanism, sample_line, targets  # noqa: E402
from soak_ledger import COMPLETED, Ledger  # noqa: E402
from soak_load import (  # noqa: E402
    Fleet,
    Holder,
    Producer,
    StandInPurge,
    drop_db,
    fresh_db,
    measure_capacity,
)
from soak_report import config, header, progress, report, say  # noqa: E402

from chunkd.db import connect  # noqa: E402
from chunkd.demo.cluster import ClusterError, PostgresCluster  # noqa: E402
from chunkd.errors import ChunkdError  # noqa: E402
from chunkd.settings import parse_duration  # noqa: E402

RESULTS = BENCH_DIR / "results"
# The default bound on dead tuples outside the held snapshot, in row versions per chunk offered
# during one autovacuum_naptime (see docs/benchmarks.md, "Sustained load"): a chunk leaves
# about 7.4 behind in the live tables with the stand-in purge (its ready row, its attempt's
# first version, its job row's updates, the purge's deletes; measured in the 10-minute run
# before its hold), and autovacuum visits each table about once a naptime; 10 leaves room for
# the vacuum's own duration.
DEAD_PER_CHUNK = 10
# --short, tests/test_soak.py: every mechanism at least once in about 90 s in all. Samples every
# 5 s (12 in the run), a 20 s hold (3-4 samples inside it), a 15 s retention that expires and
# removes jobs from 15 s on (checked from 30 s on), a 5 s capacity measurement, 5 % of it.
SHORT = {
    "duration": 60.0,
    "warmup": 10.0,
    "hold": 20.0,
    "retention": 15.0,
    "interval": 5.0,
    "capacity_seconds": 5.0,
    "load": 0.05,
}


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--duration", type=_duration, default=3600.0, help="offered load for (default 60m)")
    add("--warmup", type=_duration, default=120.0, help="left out of the targets (default 2m)")
    add("--hold", type=_duration, default=300.0, help="snapshot held for (default 5m)")
    add("--hold-at", type=_duration, help="hold from (default: centred in the run)")
    add("--retention", type=_duration, default=120.0, help="of finished jobs (default 2m)")
    add("--interval", type=_duration, default=10.0, help="sample every (default 10s)")
    add(
        "--span",
        type=_duration,
        default=600.0,
        help="first/last span compared (default 10m, at most a quarter of the run after warm-up)",
    )
    add("--daemons", type=int, default=2, help="chunkd run processes (default 2)")
    add("--concurrency", type=int, default=200, help="per daemon (default 200)")
    add("--handler", default="bench_handlers:sleep1", help="soak handler (default 1 ms sleep)")
    add(
        "--daemon-arg",
        action="append",
        default=[],
        help="one more `chunkd run` option for"
        " the soak's daemons, repeatable (e.g. --daemon-arg=--maintenance-interval=5s)",
    )
    add("--chunks-per-job", type=int, default=1, help="chunks per job (default 1)")
    add("--capacity", type=float, help="no-op chunks/s of this setup: skip measuring it")
    add("--capacity-seconds", type=_duration, default=30.0, help="measure capacity for")
    add("--load", type=_fraction, default=0.6, help="offered share of capacity (default 0.6)")
    add("--rate", type=float, help="offered chunks/s (instead of --load x capacity)")
    add(
        "--expiry-slack",
        type=_duration,
        help="a job may outlive its retention by (default:"
        " two stand-in purges, or 1m with retention)",
    )
    add(
        "--dead-bound",
        type=int,
        help="dead tuples allowed outside the hold (default: 10 per chunk offered in one"
        " autovacuum_naptime)",
    )
    add("--drain-timeout", type=_duration, default=120.0, help="after the producer stops")
    add("--short", action="store_true", help="60 s, mechanism only (the CI test)")
    add("--out", type=Path, help="the samples' JSON lines (default bench/results/soak-*.jsonl)")
    add("--mechanism-only", action="store_true", help="print the targets, do not judge them")
    add("--keep", action="store_true", help="keep the daemon logs even on success")
    given = argv or []
    explicit = {
        a.dest
        for a in p._actions
        for opt in a.option_strings
        if any(arg == opt or arg.startswith(opt + "=") for arg in given)
    }
    args = p.parse_args(argv)
    if args.short:
        for key, value in SHORT.items():
            if key not in explicit:
                setattr(args, key, value)
        args.mechanism_only = True
    problems = []
    if args.retention < 2 * args.interval:
        problems.append(
            "--retention must be at least twice --interval (each finished chunk"
            " must be sampled before it expires)"
        )
    if args.interval <= 0 or args.hold <= 0 or args.duration <= args.warmup:
        problems.append("--interval and --hold must be positive, --duration above --warmup")
    if args.hold_at is None:
        args.hold_at = max(args.warmup, (args.duration - args.hold) / 2)
    if args.hold_at + args.hold > args.duration:
        problems.append("the hold must end before --duration")
    if min(args.daemons, args.concurrency, args.chunks_per_job) < 1:
        problems.append("--daemons, --concurrency and --chunks-per-job must be >= 1")
    if (args.rate is not None and args.rate <= 0) or (
        args.capacity is not None and args.capacity <= 0
    ):
        problems.append("--rate and --capacity must be positive")
    if problems:
        p.error("; ".join(problems))
    args.span = min(args.span, (args.duration - args.warmup) / 4)
    return args


async def _rate(args: argparse.Namespace, cluster: PostgresCluster, work: Path) -> float:
    if args.rate is None and args.capacity is None:
        say(
            f"soak: measuring the no-op capacity ({args.daemons} daemons x {args.concurrency},"
            f" {args.capacity_seconds:g} s) ..."
        )
        dsn = await fresh_db(cluster, "capacity")
        measured = await measure_capacity(
            dsn, work, args.daemons, args.concurrency, args.chunks_per_job, args.capacity_seconds
        )
        await drop_db(cluster, "capacity")
        args.capacity = measured.per_s
        args.capacity_measured = True
        if measured.ran_dry:
            say(
                f"soak: the backlog ran dry {measured.ran_dry} times while measuring: the"
                " producer, not the daemons, set the capacity"
            )
    rate = float(args.rate if args.rate is not None else args.capacity * args.load)
    return max(rate, float(args.chunks_per_job))


def _plan(args: argparse.Namespace, rate: float, slack: float, naptime_s: float) -> Plan:
    """The run's timeline and bounds. Dead tuples: DEAD_PER_CHUNK row versions per chunk
    offered in one autovacuum_naptime, unless --dead-bound says otherwise."""
    return Plan(
        rate=rate,
        duration=args.duration,
        warmup=args.warmup,
        hold_start=args.hold_at,
        hold_s=args.hold,
        retention_s=args.retention,
        expiry_slack_s=slack,
        interval=args.interval,
        span=args.span,
        recovery_span=min(60.0, args.span / 2),
        dead_bound=args.dead_bound or int(DEAD_PER_CHUNK * rate * naptime_s),
        dead_settle_s=180.0,
    )


@dataclass
class Soak:
    """One soak in flight: what it runs against and its parts."""

    plan: Plan
    dsn: str
    history: bool  # finished jobs move to history tables (retention)
    ledger: Ledger
    producer: Producer
    holder: Holder
    out: TextIO
    drain_timeout: float
    start: float = 0.0  # time.monotonic() at t = 0
    t_zero: datetime | None = None  # the database clock at t = 0

    async def hold(self, observer: Any) -> None:
        plan, holder = self.plan, self.holder
        await asyncio.sleep(max(0.0, self.start + plan.hold_start - time.monotonic()))
        await holder.hold(observer)
        say(f"soak: snapshot held from {self.elapsed:.0f} s (xmin {holder.info['xmin']})")
        await asyncio.sleep(max(0.0, self.start + plan.hold_end - time.monotonic()))
        await holder.release(observer)
        say(f"soak: snapshot released at {self.elapsed:.0f} s")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    async def sample(self, sampler: Any, observer: Any, t0: float) -> Sample:
        """Scan, account, read the tables; write the sample's line and print it."""
        plan, ledger = self.plan, self.ledger
        held = self.holder.holding
        scan = await soak_db.scan(sampler, ledger.low_water, self.history)
        window = ledger.apply(scan.seqs, scan.waits_ms, scan.done, scan.next_low_water)
        assert self.t_zero is not None
        sample = Sample(
            t0=t0,
            t=(scan.at - self.t_zero).total_seconds(),
            created=window.created,
            completed=window.completed,
            latency=window.latency,
            tables=await soak_db.tables(observer),
            xmin_age=await soak_db.xmin_age(observer),
            expired=await soak_db.expired_jobs(
                observer, plan.retention_s + plan.expiry_slack_s, self.history
            ),
            held=held and self.holder.holding,
        )
        behind = round(self.producer.behind_s(self.start, plan.duration), 3)
        extra = {"kind": "sample", "low_water": ledger.low_water, "producer_behind_s": behind}
        line = sample_line(plan, sample, extra)
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()
        say(progress(sample, behind))
        return sample

    async def sample_until_drained(self) -> tuple[list[Sample], bool]:
        """A sample every interval until the producer has stopped and every chunk it enqueued
        is seen completed (or the drain timeout passed)."""
        sampler = await connect(self.dsn, application_name="chunkd-soak-sampler")
        observer = await connect(self.dsn, application_name="chunkd-soak-observer")
        samples: list[Sample] = []
        try:
            await soak_db.prepare_sampler(sampler)
            k = 1
            while True:
                await asyncio.sleep(
                    max(0.0, self.start + k * self.plan.interval - time.monotonic())
                )
                k += 1
                samples.append(
                    await self.sample(sampler, observer, samples[-1].t if samples else 0)
                )
                if self.elapsed >= self.plan.duration:
                    chunks = self.producer.chunks
                    drained = chunks == self.producer.scheduled(self.plan.duration) and (
                        self.ledger.count(chunks, COMPLETED) == chunks
                    )
                    if drained or self.elapsed > self.plan.duration + self.drain_timeout:
                        return samples, drained
        finally:
            sampler.terminate()
            observer.terminate()


async def _retention(
    args: argparse.Namespace, dsn: str
) -> tuple[str, str, float, StandInPurge | None]:
    """Short policies when the schema has retention, else the stand-in purge: the mode, a note
    for the output, how long past its retention a job may still be there, the stand-in."""
    conn = await connect(dsn)
    try:
        if await soak_db.has_retention(conn):
            width = await soak_db.set_retention(conn, args.retention)
            note = (
                f"chunkd.set_retention('completed'|'failed'|'cancelled', '{args.retention:g} s');"
                f" history partitions {width:g} s wide, moved and dropped by the daemons"
            )
            return "retention", note, width + 60.0, None
    finally:
        await conn.close()
    every = max(args.interval / 2, min(args.retention / 4, 10.0))
    note = (
        "no chunkd.set_retention in this schema: STAND-IN,"
        f" chunkd.purge_finished_jobs('{args.retention:g} s') every {every:g} s"
    )
    return (
        "stand-in purge",
        note,
        2 * every + args.interval,
        StandInPurge(dsn, args.retention, every),
    )


async def run(args: argparse.Namespace, cluster: PostgresCluster, work: Path) -> bool:
    rate = await _rate(args, cluster, work)
    dsn = await fresh_db(cluster, "soak")
    mode, note, slack, purger = await _retention(args, dsn)
    if args.expiry_slack is not None:
        slack = args.expiry_slack
    conn = await connect(dsn)
    try:
        history = await soak_db.has_history(conn)
        server = await conn.fetchrow(
            "SELECT current_setting('server_version') AS v, current_setting('fsync') AS fsync,"
            " current_setting('autovacuum_naptime') AS naptime,"
            " (SELECT setting::float8 FROM pg_settings WHERE name = 'autovacuum_naptime')"
            " AS naptime_s"
        )
    finally:
        await conn.close()
    assert server is not None
    plan = _plan(args, rate, slack, server["naptime_s"])
    header(args, plan, server, note)

    path = args.out or RESULTS / f"soak-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(dsn, work, args.daemons, args.handler, args.concurrency, tuple(args.daemon_arg))
    producer = Producer(dsn, rate, args.chunks_per_job)
    stop = asyncio.Event()
    with path.open("w") as out:
        out.write(json.dumps(config(args, rate, plan, mode)) + "\n")
        soak = Soak(
            plan, dsn, history, Ledger(int(rate * plan.duration) + args.chunks_per_job),
            producer, Holder(dsn), out, args.drain_timeout,
        )  # fmt: skip
        conn = await connect(dsn)
        observer = await connect(dsn, application_name="chunkd-soak-hold-observer")
        tasks: list[asyncio.Task[None]] = []
        try:
            await fleet.wait_registered(conn)
            soak.t_zero = await conn.fetchval("SELECT clock_timestamp()")
            soak.start = time.monotonic()
            tasks.append(asyncio.create_task(producer.run(soak.start, plan.duration, stop)))
            tasks.append(asyncio.create_task(soak.hold(observer)))
            if purger:
                tasks.append(asyncio.create_task(purger.run(stop)))
            samples, drained = await soak.sample_until_drained()
            stop.set()
            await asyncio.gather(*tasks)
            leftovers = await soak_db.leftovers(conn, history)
            final_expired = await soak_db.expired_jobs(
                conn, plan.retention_s + plan.expiry_slack_s, history
            )
        finally:
            # Whatever happened: nothing of the soak outlives it (a cancelled call may leave
            # its connection busy: terminate, do not wait).
            stop.set()
            exits = fleet.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await soak.holder.drop()
            conn.terminate()
            observer.terminate()
        facts = Facts(
            enqueued=producer.chunks,
            scheduled=producer.scheduled(plan.duration),
            enqueue_errors=producer.errors + (purger.errors if purger else []),
            producer_lag_s=producer.lag_s,
            retention_mode=mode,
            jobs_enqueued=producer.jobs,
            leftovers=leftovers,
            final_expired=final_expired,
            holder=soak.holder.info,
            daemon_exits=exits,
            drained=drained,
        )
        checks = mechanism(plan, samples, soak.ledger, facts)
        goals = targets(plan, samples)
        ok = all(c.ok is not False for c in checks + ([] if args.mechanism_only else goals))
        result = {
            "kind": "result",
            "ok": ok,
            "loadavg_end": os.getloadavg(),
            "checks": [c.__dict__ for c in checks + goals],
            "purged_by_stand_in": purger.purged if purger else None,
        }
        out.write(json.dumps(result) + "\n")
    report(plan, rate, args, mode, samples, checks, goals, path)
    say("RESULT: PASS" if ok else "RESULT: FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = Path(tempfile.mkdtemp(prefix="chunkd-soak-"))
    try:
        cluster = PostgresCluster(fsync=True)
        cluster.start()
    except ClusterError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    ok = False
    try:
        ok = asyncio.run(run(args, cluster, work))
    except (ChunkdError, RuntimeError, OSError) as exc:  # setup: daemons, connections
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cluster.cleanup()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"daemon logs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
