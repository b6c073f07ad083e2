"""Chaos soak: proves that no chunk is lost or completed twice while everything around the
daemons fails.

    python bench/chaos.py --duration 60 --kill-every 2-5 --chunks 10000

A throwaway Postgres cluster with fsync on; 3 ``chunkd run`` processes x concurrency 16 running
``bench/chaos_handler.py`` (5-50 ms, every execution recorded with the database clock, 2 %
transient failures); 20 jobs (some with ``max_concurrency = 1``). During ``--duration``: a random
daemon is SIGKILLed every ``--kill-every`` seconds and replaced; random chunkd connections are
cut with ``pg_terminate_backend``; the database turns read-only for a few seconds once; Postgres
restarts once; one daemon is frozen with SIGSTOP for longer than its lease, then resumed with
SIGCONT; one daemon is stopped with SIGTERM and replaced. Beside the 20 jobs: a continuation
chain (a ``max_concurrency = 1`` job that starts with one page and appends the next from each
completion) and a schedule firing every 5 s (every daemon fires schedules); and the mixed
workload of ``chaos_mix``: two long jobs, a stream of small new jobs throughout, two jobs under
one concurrency key, whose claims are checked for order, limits and fair turns (the bound of
docs/guarantees.md, ``chaos_fairness``). Then the chaos stops and the run must converge. The
figures printed at the end are checked, and the exit code is 1 unless every check holds (2 for
a setup error).

All times compared come from the database host's clock: the database's ``clock_timestamp()``,
and the handler's, taken on the same host when things happen (see ``chaos_handler``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import ClusterError, PostgresCluster

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from chaos_fairness import Life  # noqa: E402
from chaos_handler import EXECUTIONS_DDL  # noqa: E402
from chaos_mix import KEY, KEY_LIMIT, Mix, mixed_checks, most_at_once  # noqa: E402

__all__ = ["main"]

DAEMONS = 3
CONCURRENCY = 16
JOBS = 20
LIMITED_JOBS = 5
KIND = "chaos"
LEASE_S = 3.0
CHAIN_KIND = "chaos_chain"
TICK_KIND = "chaos_tick"
SCHEDULE = "chaos-every-5s"
DAEMON_ARGS = [
    "--handler", f"{KIND}=chaos_handler:handle",
    "--handler", f"{CHAIN_KIND}=chaos_handler:chain",
    "--handler", f"{TICK_KIND}=chaos_handler:handle",
    "--schedule-interval", "500ms",
    "--concurrency", str(CONCURRENCY),
    "--lease", f"{LEASE_S:g}s",
    "--reap-interval", "500ms",
    "--retry-base", "100ms",
    "--retry-cap", "2s",
    "--poll-interval", "5s",
    "--shutdown-timeout", "5s",
    # The checks read every claim from the live tables (chunkd.attempts, chunks, jobs), which
    # the maintenance empties as jobs finish: it is off here (the soak, bench/soak.py, runs it
    # under load; tests/test_daemon_maintenance.py in a daemon).
    "--maintenance-interval", "0",
]  # fmt: skip
# Enough attempts that chaos (kills, cut connections) plus planned failures never exhaust one:
# a chunk failed for good would be legal, but it would hide whether the run really converged.
MAX_ATTEMPTS = 25
# How long the database is read-only, and how long a daemon stays frozen (beyond its lease).
READ_ONLY_S = 3.0
STALL_S = 2 * LEASE_S
# A chunk claimed this long ago whose lease is still being renewed is stuck: handlers take
# 5-50 ms, the longest fault (a Postgres restart, the read-only window) a few seconds, and a
# handler that cannot renew its lease is given up after one lease. (Shorter than a daemon
# lives here, about 10 s between kills, or the kills would hide a stuck chunk.)
STUCK_AFTER_S = 8.0
T = TypeVar("T")


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# The database, seen by the soak itself (reconnects: the soak restarts Postgres)
# --------------------------------------------------------------------------------------------


class Db:
    """One control connection, re-opened whenever the chaos takes it down."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    # Read-write even in the read-only window: the soak ends it, and enqueues.
                    self._conn = await asyncpg.connect(
                        self._dsn,
                        server_settings={
                            "application_name": "chaos-control",
                            "default_transaction_read_only": "off",
                        },
                    )
                return await call(self._conn)
            except (
                OSError,
                asyncpg.InterfaceError,
                asyncpg.PostgresConnectionError,
                asyncpg.exceptions.AdminShutdownError,
                asyncpg.exceptions.CannotConnectNowError,
            ):
                if time.monotonic() > deadline:
                    raise
                self._conn = None
                await asyncio.sleep(0.1)

    async def now(self) -> datetime:
        return await self.run(lambda c: c.fetchval("SELECT clock_timestamp()"))

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


# --------------------------------------------------------------------------------------------
# The daemons
# --------------------------------------------------------------------------------------------


@dataclass
class DaemonProcess:
    number: int
    process: subprocess.Popen[bytes]
    log_path: Path
    # The host's clock, which is the database's (the cluster runs on this host).
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None
    ended_by: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Kill:
    pid: int
    at: datetime  # database clock, after the process was reaped
    held: list[UUID] = field(default_factory=list)  # queue ids it held at death


class Fleet:
    def __init__(self, dsn: str, log_dir: Path) -> None:
        self._dsn = dsn
        self._log_dir = log_dir
        self.all: list[DaemonProcess] = []
        self._env = dict(os.environ)
        self._env.update(
            CHUNKD_DSN=dsn,
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])
            ),
        )

    @property
    def running(self) -> list[DaemonProcess]:
        return [d for d in self.all if d.ended_by is None]

    def start(self) -> DaemonProcess:
        number = len(self.all)
        log_path = self._log_dir / f"daemon{number:03d}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "chunkd.cli", "--log-format", "json", "run", *DAEMON_ARGS],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        daemon = DaemonProcess(number, process, log_path)
        self.all.append(daemon)
        return daemon

    async def sigkill(self, daemon: DaemonProcess, db: Db) -> Kill:
        daemon.ended_by = "SIGKILL"
        daemon.process.kill()
        await asyncio.to_thread(daemon.process.wait)
        at = await db.now()
        daemon.ended_at = at
        held = await db.run(
            lambda c: c.fetch(
                "SELECT c.queue_id AS id FROM chunkd.attempts a"
                " JOIN chunkd.chunks c ON c.id = a.chunk_id"
                " WHERE a.ended_at IS NULL AND a.worker_id LIKE $1",
                f"%:{daemon.pid}:%",
            )
        )
        return Kill(daemon.pid, at, [r["id"] for r in held])

    async def sigterm(self, daemon: DaemonProcess, db: Db) -> int:
        daemon.ended_by = "SIGTERM"
        daemon.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.process.wait, 60)
        daemon.ended_at = await db.now()
        return code

    def kill_all(self) -> None:
        for daemon in self.all:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()

    def log_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for daemon in self.all:
            for line in daemon.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    event["_pid"] = daemon.pid
                    events.append(event)
        return events


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Chaos:
    kills: list[Kill] = field(default_factory=list)
    terminated_backends: int = 0
    postgres_restarts: int = 0
    graceful_stops: list[tuple[int, int]] = field(default_factory=list)  # (pid, exit code)
    daemon_exits: list[tuple[int, int]] = field(default_factory=list)  # unexpected deaths
    # Started while Postgres was restarting: `chunkd run` exits 2 at once (as systemd's
    # Restart=on-failure would, we start it again). Counted, not a failure of the soak.
    startup_refused: int = 0
    read_only: tuple[datetime, datetime] | None = None  # database clock
    stalled: Stall | None = None
    stuck: set[tuple[int, int]] = field(default_factory=set)  # (chunk id, claim number)


@dataclass
class Stall:
    daemon: DaemonProcess
    stopped_at: datetime  # database clock, just before SIGSTOP
    resumed_at: datetime | None = None  # database clock, just after SIGCONT


def limited_job_size(total_chunks: int, duration_s: float) -> int:
    """A max_concurrency = 1 job runs one chunk at a time (~40 ms each here, plus a lease of
    stall whenever its daemon is killed), so its size follows the duration."""
    return max(20, min(int(duration_s * 4), total_chunks // 40))


def plan_jobs(total_chunks: int, duration_s: float) -> list[tuple[int, int | None]]:
    """(chunks, max_concurrency) for each job: LIMITED_JOBS limited ones (limited_job_size),
    the unlimited ones share the rest."""
    limited_size = limited_job_size(total_chunks, duration_s)
    rest = total_chunks - LIMITED_JOBS * limited_size
    unlimited = JOBS - LIMITED_JOBS
    sizes = [rest // unlimited + (1 if i < rest % unlimited else 0) for i in range(unlimited)]
    jobs: list[tuple[int, int | None]] = [(n, None) for n in sizes]
    for i in range(LIMITED_JOBS):
        jobs.insert(i * 4 + 1, (limited_size, 1))
    return jobs


async def enqueue(db: Db, mix: Mix, n: int, max_concurrency: int | None, job_no: int) -> UUID:
    label = f"job {job_no}" + (" (max_concurrency = 1)" if max_concurrency == 1 else "")
    chunks = [{"job": job_no, "i": i} for i in range(n)]
    return await mix.enqueue(db, chunks, label, max_concurrency=max_concurrency)


async def unfinished(db: Db) -> int:
    return await db.run(
        lambda c: c.fetchval(
            "SELECT coalesce(sum(pending_chunks + processing_chunks), 0)::int"
            " FROM chunkd.chunk_processing_status"
        )
    )


async def run_chaos(
    args: argparse.Namespace, cluster: PostgresCluster, dsn: str, db: Db, fleet: Fleet, mix: Mix
) -> Chaos:
    chaos = Chaos()
    rng = random.Random(args.seed)
    lo, hi = args.kill_every
    jobs = plan_jobs(args.chunks, args.duration)
    # Half the jobs at once, the rest spread over the first 80 % of the run, so chunks are
    # being enqueued, claimed and completed while the chaos goes on.
    enqueue_at = [0.0] * (JOBS // 2) + [
        args.duration * 0.8 * (i + 1) / (JOBS - JOBS // 2) for i in range(JOBS - JOBS // 2)
    ]
    read_only_at = args.duration * rng.uniform(0.12, 0.2)
    restart_at = args.duration * rng.uniform(0.27, 0.37)
    stall_at = args.duration * rng.uniform(0.45, 0.5)
    sigterm_at = args.duration * rng.uniform(0.65, 0.75)
    chain_pages = max(20, int(args.duration * 4))
    await db.run(
        lambda c: c.fetchval(
            "SELECT chunkd.create_sync_job($1, $2::jsonb, max_concurrency => 1,"
            " max_attempts => $3)",
            CHAIN_KIND,
            json.dumps([{"page": 0, "last": chain_pages - 1}]),
            MAX_ATTEMPTS,
        )
    )
    await db.run(
        lambda c: c.fetchval(
            "SELECT chunkd.create_schedule($1, '*/5 * * * * *', $2, '[{}]', dedupe => false,"
            " max_attempts => $3)",
            SCHEDULE,
            TICK_KIND,
            MAX_ATTEMPTS,
        )
    )
    await mix.start(db, args.chunks, limited_job_size(args.chunks, args.duration))
    started = time.monotonic()
    next_kill = rng.uniform(lo, hi)
    next_cut = rng.uniform(1.0, 4.0)
    next_sample = 1.0
    read_only_until: float | None = None
    read_only_from: datetime | None = None
    stall_until = 0.0
    job_no = 0

    def elapsed() -> float:
        return time.monotonic() - started

    while elapsed() < args.duration:
        t = elapsed()
        while job_no < JOBS and enqueue_at[job_no] <= t:
            n, limit = jobs[job_no]
            await enqueue(db, mix, n, limit, job_no)
            job_no += 1
        await mix.stream(db, t, args.duration * 0.9)
        await replace_dead(fleet, chaos, db)
        frozen = chaos.stalled.daemon if chaos.stalled and not chaos.stalled.resumed_at else None
        if t >= next_sample:
            await sample_stuck(db, chaos)
            next_sample = t + 1.0
        if chaos.read_only is None and read_only_until is None and t >= read_only_at:
            say(f"  {t:6.1f}s database read-only for {READ_ONLY_S:g}s")
            await set_read_only(db, True)
            read_only_from = await db.now()
            read_only_until = t + READ_ONLY_S
        if read_only_until is not None and t >= read_only_until:
            await set_read_only(db, False)
            assert read_only_from is not None
            chaos.read_only = (read_only_from, await db.now())
            read_only_until = None
        # No kills from the read-only window until a chunk it left stuck would show: the
        # daemons that lived through it must live long enough to be caught.
        read_only_quiet = read_only_at <= t < read_only_at + READ_ONLY_S + STUCK_AFTER_S + 2
        if t >= next_kill and not read_only_quiet:
            victim = rng.choice([d for d in fleet.running if d is not frozen])
            kill = await fleet.sigkill(victim, db)
            chaos.kills.append(kill)
            fleet.start()
            say(f"  {t:6.1f}s SIGKILL pid {kill.pid} (held {len(kill.held)} chunks)")
            next_kill = t + rng.uniform(lo, hi)
        if t >= next_cut:
            count = rng.randint(1, 3)
            cut = await db.run(
                lambda c, count=count: c.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM ("
                    "  SELECT pid FROM pg_stat_activity"
                    "  WHERE application_name IN ('chunkd', 'chunkd-listener')"
                    "    AND datname = current_database()"
                    "  ORDER BY random() LIMIT $1) x",
                    count,
                )
            )
            chaos.terminated_backends += cut
            next_cut = t + rng.uniform(1.0, 4.0)
        if chaos.postgres_restarts == 0 and t >= restart_at:
            say(f"  {t:6.1f}s restarting Postgres")
            await asyncio.to_thread(cluster.restart)
            chaos.postgres_restarts += 1
        ready = [
            d for d in fleet.running if d is not frozen and "daemon.ready" in d.log_path.read_text()
        ]
        if chaos.stalled is None and t >= stall_at and ready:
            # A daemon that is up and holds chunks (looked for every 0.5 s from stall_at on),
            # frozen for longer than its lease: its chunks are reaped and run elsewhere; on
            # SIGCONT it must give them up at once, not run on beside them.
            victim, held = await busiest(db, ready)
            if held:
                chaos.stalled = Stall(victim, await db.now())
                victim.process.send_signal(signal.SIGSTOP)
                stall_until = t + STALL_S
                say(f"  {t:6.1f}s SIGSTOP pid {victim.pid} (holding {held}) for {STALL_S:g}s")
            else:
                stall_at = t + 0.5
        if frozen is not None and chaos.stalled is not None and t >= stall_until:
            frozen.process.send_signal(signal.SIGCONT)
            chaos.stalled.resumed_at = await db.now()
            say(f"  {t:6.1f}s SIGCONT pid {frozen.pid}")
        if not chaos.graceful_stops and t >= sigterm_at and ready:
            # A daemon that is up: a SIGTERM before its signal handlers exist just kills it.
            victim = rng.choice(ready)
            fleet.start()
            say(f"  {t:6.1f}s SIGTERM pid {victim.pid}")
            code = await fleet.sigterm(victim, db)
            chaos.graceful_stops.append((victim.pid, code))
        await asyncio.sleep(0.05)
    if read_only_until is not None and read_only_from is not None:  # a very short --duration
        await set_read_only(db, False)
        chaos.read_only = (read_only_from, await db.now())
    if chaos.stalled is not None and chaos.stalled.resumed_at is None:
        chaos.stalled.daemon.process.send_signal(signal.SIGCONT)
        chaos.stalled.resumed_at = await db.now()
    while job_no < JOBS:  # a very short --duration still enqueues every job
        n, limit = jobs[job_no]
        await enqueue(db, mix, n, limit, job_no)
        job_no += 1
    # The schedule stops with the chaos, so the run can converge (paused: its fires stay).
    await db.run(lambda c: c.execute("SELECT chunkd.pause_schedule($1)", SCHEDULE))
    return chaos


async def set_read_only(db: Db, on: bool) -> None:
    """The whole cluster read-only (new transactions of every session), or writable again."""
    statement = (
        "ALTER SYSTEM SET default_transaction_read_only = on"
        if on
        else "ALTER SYSTEM RESET default_transaction_read_only"
    )
    await db.run(lambda c: c.execute(statement))
    await db.run(lambda c: c.execute("SELECT pg_reload_conf()"))


async def busiest(db: Db, daemons: list[DaemonProcess]) -> tuple[DaemonProcess, int]:
    """The daemon holding the most chunks right now, and how many it holds."""
    rows = await db.run(
        lambda c: c.fetch(
            "SELECT split_part(worker_id, ':', 2)::int AS pid, count(*) AS held"
            " FROM chunkd.attempts WHERE ended_at IS NULL GROUP BY 1"
        )
    )
    held = {r["pid"]: r["held"] for r in rows}
    victim = max(daemons, key=lambda d: held.get(d.pid, 0))
    return victim, held.get(victim.pid, 0)


async def sample_stuck(db: Db, chaos: Chaos) -> None:
    """Claims open for longer than any handler runs whose lease is still being renewed."""
    rows = await db.run(
        lambda c: c.fetch(
            "SELECT a.chunk_id, a.n FROM chunkd.attempts a WHERE a.ended_at IS NULL"
            " AND a.claimed_at < now() - $1::float8 * interval '1 second'"
            " AND a.lease_expires_at > now()",
            STUCK_AFTER_S,
        )
    )
    chaos.stuck.update((r["chunk_id"], r["n"]) for r in rows)


# How long the final stop waits for a daemon still starting to be up (seconds).
READY_WAIT_S = 30.0


async def _until_up(daemon: DaemonProcess, timeout_s: float) -> None:
    """Until ``daemon`` logged daemon.ready or exited, at most ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and daemon.process.poll() is None:
        if "daemon.ready" in daemon.log_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)


async def replace_dead(fleet: Fleet, chaos: Chaos, db: Db) -> None:
    """A daemon that exited by itself is started again (as systemd would)."""
    for daemon in fleet.running:
        code = daemon.process.poll()
        if code is None:
            continue
        daemon.ended_by = f"exit {code}"
        daemon.ended_at = await db.now()
        text = daemon.log_path.read_text(errors="replace")
        if "daemon.ready" not in text and ("cannot connect" in text or "read-only" in text):
            # Refused at start-up, saying why: Postgres restarting, or the read-only window.
            chaos.startup_refused += 1
        else:
            chaos.daemon_exits.append((daemon.pid, code))
        fleet.start()


# --------------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    value: str
    ok: bool | None  # None: a figure, not a pass/fail check


@dataclass(frozen=True)
class _Span:
    """A stretch of time in which an execution's handler could run."""

    start: datetime
    end: datetime
    execution: asyncpg.Record


def _spans(
    e: asyncpg.Record, claim_end: dict[tuple[UUID, int], datetime], stall: Stall | None
) -> list[_Span]:
    """When an execution could run.

    An execution cut short (its daemon killed or stopped) has no end of its own; it counts as
    running until its claim ended (reaped or released), which is what the queue promised; one
    that never ended and was never reaped counts as running for ever. An execution of the
    frozen daemon ran nothing while the daemon was frozen: it counts before the SIGSTOP, and
    after the SIGCONT unless it was cancelled (its sleep of at most 50 ms was long over by
    then, so a handler cancelled at all was cancelled before running on).
    """
    end = e["ended_at"] or claim_end.get((e["queue_id"], e["attempt"]))
    if end is None:
        end = datetime.max.replace(tzinfo=e["started_at"].tzinfo)
    if stall is None or stall.resumed_at is None or e["pid"] != stall.daemon.pid:
        return [_Span(e["started_at"], end, e)]
    if not e["started_at"] < stall.stopped_at < end:
        return [_Span(e["started_at"], end, e)]
    spans = [_Span(e["started_at"], stall.stopped_at, e)]
    if not e["cancelled"] and end > stall.resumed_at:
        spans.append(_Span(stall.resumed_at, end, e))
    return spans


def _overlaps(spans: list[_Span], examples: list[str]) -> int:
    """Executions of one limited job that started while an earlier one had not ended."""
    count = 0
    latest: _Span | None = None
    for span in sorted(spans, key=lambda s: s.start):
        if latest is not None and span.start < latest.end:
            count += 1
            if len(examples) < 5:
                e, before = span.execution, latest.execution
                examples.append(
                    f"seq {e['seq']} attempt {e['attempt']} (pid {e['pid']}) ran "
                    f"{(latest.end - span.start).total_seconds():.3f}s before seq "
                    f"{before['seq']} attempt {before['attempt']} (pid {before['pid']}, "
                    f"ended {'by its claim' if before['ended_at'] is None else 'itself'}) ended"
                )
        if latest is None or span.end > latest.end:
            latest = span
    return count


def _ran_on_after_resuming(
    executions: list[asyncpg.Record],
    claim_end: dict[tuple[UUID, int], datetime],
    stall: Stall | None,
) -> int:
    """Handlers of the frozen daemon that went on after SIGCONT although their claim had
    already ended (reaped while the daemon was frozen): the daemon did not give up a lease it
    could not show it held."""
    if stall is None or stall.resumed_at is None:
        return 0
    resumed_at = stall.resumed_at
    count = 0
    for e in executions:
        ended = claim_end.get((e["queue_id"], e["attempt"]))
        if (
            e["pid"] == stall.daemon.pid
            and e["started_at"] < stall.stopped_at
            and ended is not None
            and ended < resumed_at
            and e["ended_at"] is not None
            and e["ended_at"] > resumed_at
            and not e["cancelled"]
        ):
            count += 1
    return count


async def analyse(db: Db, chaos: Chaos, fleet: Fleet, converged: bool, mix: Mix) -> list[Check]:
    q = await db.run(
        lambda c: c.fetch(
            "SELECT q.id, q.status, q.attempts, q.error_message, j.max_concurrency,"
            " q.parent_sync_job_id FROM chunkd.chunk_processing_queue q"
            " JOIN chunkd.sync_jobs j ON j.id = q.parent_sync_job_id"
        )
    )
    executions = await db.run(lambda c: c.fetch("SELECT * FROM chaos_executions"))
    events = await db.run(
        lambda c: c.fetch(
            "SELECT queue_id, event, attempt, worker_id, at FROM chunkd.chunk_events"
            " WHERE event <> 'enqueued'"
        )
    )
    logs = fleet.log_events()
    total = len(q)
    terminal = sum(r["status"] in ("completed", "failed", "cancelled") for r in q)
    completed = [r for r in q if r["status"] == "completed"]
    failed = [r for r in q if r["status"] == "failed"]
    lost = [
        r
        for r in q
        if r["status"] != "completed" and not (r["status"] == "failed" and r["error_message"])
    ]

    completions = Counter(e["queue_id"] for e in events if e["event"] == "completed")
    completed_twice = sum(1 for n in completions.values() if n > 1)
    claim_end: dict[tuple[UUID, int], datetime] = {}
    for e in events:  # whatever ended each claim: an outcome, a reap, a release
        if e["event"] in ("completed", "failed", "retry_scheduled", "reaped", "released"):
            # released spends no attempt: its row carries the attempt count after the release.
            attempt = e["attempt"] + (1 if e["event"] == "released" else 0)
            claim_end.setdefault((e["queue_id"], attempt), e["at"])
    completed_by = {e["queue_id"]: e["worker_id"] for e in events if e["event"] == "completed"}

    by_queue: dict[UUID, list[asyncpg.Record]] = defaultdict(list)
    for e in executions:
        by_queue[e["queue_id"]].append(e)
    # A completed chunk must have a finished, successful execution of its final attempt.
    unbacked = sum(
        1
        for r in completed
        if not any(
            e["attempt"] == r["attempts"] and e["ended_at"] and e["failed"] is False
            for e in by_queue[r["id"]]
        )
    )

    limited_jobs: dict[UUID, list[_Span]] = defaultdict(list)
    limited_queue = {r["id"] for r in q if r["max_concurrency"] == 1}
    for e in executions:
        if e["queue_id"] in limited_queue:
            limited_jobs[e["job_id"]].extend(_spans(e, claim_end, chaos.stalled))
    overlap_examples: list[str] = []
    overlaps = sum(_overlaps(v, overlap_examples) for v in limited_jobs.values())
    ran_on = _ran_on_after_resuming(executions, claim_end, chaos.stalled)
    keyed = {
        r["public_id"]
        for r in await db.run(
            lambda c: c.fetch("SELECT public_id FROM chunkd.jobs WHERE concurrency_key = $1", KEY)
        )
    }
    key_spans = [
        (span.start, span.end)
        for e in executions
        if e["job_id"] in keyed
        for span in _spans(e, claim_end, chaos.stalled)
    ]
    key_running = most_at_once(key_spans)
    lives = [
        Life(d.pid, d.started_at, d.ended_at, 3 * CONCURRENCY)  # a claim takes <= 3 x slots
        for d in fleet.all
    ]
    mixed = await mixed_checks(db, mix, lives)

    crashed = sum(e.get("event") == "task.crashed" for e in logs)
    fenced_logs = [e for e in logs if e.get("event") == "chunk.fenced"]
    fenced_ids = {e.get("queue_id") for e in fenced_logs}

    # Why did a chunk run more than once? Classify every execution that was not its last.
    killed = {k.pid: k for k in chaos.kills}
    stopped = {pid for pid, _ in chaos.graceful_stops}
    reasons: Counter[str] = Counter()
    frozen_pid = chaos.stalled.daemon.pid if chaos.stalled else None
    frozen_at = chaos.stalled.stopped_at if chaos.stalled else datetime.max.replace(tzinfo=UTC)
    for queue_id, runs in by_queue.items():
        runs = sorted(runs, key=lambda e: e["started_at"])
        for e in runs[:-1]:
            kill = killed.get(e["pid"])
            if e["failed"]:
                reasons["planned transient failure"] += 1
            elif e["cancelled"]:
                reasons["cancelled: its daemon could not show it held the lease"] += 1
            elif e["pid"] == frozen_pid and e["started_at"] < frozen_at:
                reasons["in flight when its daemon was frozen (SIGSTOP)"] += 1
            elif kill is not None and e["started_at"] <= kill.at and e["ended_at"] is None:
                reasons["in flight at a SIGKILL (never ended)"] += 1
            elif kill is not None and e["started_at"] <= kill.at:
                reasons["ended just before a SIGKILL, outcome not yet written"] += 1
            elif e["pid"] in stopped and e["ended_at"] is None:
                reasons["cancelled and released by the graceful stop"] += 1
            elif str(queue_id) in fenced_ids:
                reasons["outcome fenced out (lease lost meanwhile)"] += 1
            else:
                reasons["other (connection cut / Postgres restart)"] += 1
    extra = len(executions) - len(by_queue)

    recoveries: list[float] = []
    not_rerun = 0
    completed_by_dead = 0
    for kill in chaos.kills:
        for queue_id in kill.held:
            later = [
                e["started_at"] for e in by_queue.get(queue_id, []) if e["started_at"] > kill.at
            ]
            if later:
                recoveries.append((min(later) - kill.at).total_seconds())
            elif f":{kill.pid}:" in (completed_by.get(queue_id) or ""):
                # Its completion statement had reached the server before the kill and committed
                # just after it: nothing to run again.
                completed_by_dead += 1
            else:
                not_rerun += 1

    never_started = sum(
        1
        for e in events
        if e["event"] == "claimed"
        and not any(x["attempt"] == e["attempt"] for x in by_queue.get(e["queue_id"], []))
    )

    growing = await growing_checks(db)

    def pct(n: int) -> str:
        return f"{100.0 * n / total:.2f} % ({n}/{total})" if total else "n/a (no chunks)"

    checks = [
        Check("converged within the bound", "yes" if converged else "NO", converged),
        Check("chunks terminal", pct(terminal), total > 0 and terminal == total),
        Check("  completed / failed for good", f"{len(completed)} / {len(failed)}", None),
        Check("lost (neither completed nor failed with an error)", str(len(lost)), not lost),
        Check(
            "completed twice (chunk_events 'completed' > 1)",
            str(completed_twice),
            completed_twice == 0,
        ),
        Check("completed without a finished execution", str(unbacked), unbacked == 0),
        Check("max_concurrency = 1 chunks that overlapped in time", str(overlaps), overlaps == 0),
        *growing,
        *(Check(f"  e.g. {text}", "", None) for text in overlap_examples),
        Check(
            f"concurrency key '{KEY}': most handlers running at once",
            f"{key_running} ({len(key_spans)} executions)",
            0 < key_running <= KEY_LIMIT,
        ),
        *(Check(name, value, ok) for name, value, ok in mixed),
        Check(
            f"chunks stuck processing under a renewed lease (claimed > {STUCK_AFTER_S:g} s ago)",
            str(len(chaos.stuck)),
            not chaos.stuck,
        ),
        *_stall_checks(chaos, logs, ran_on),
        *_read_only_checks(chaos, logs),
        Check(
            "daemon tasks that crashed and were restarted (task.crashed)",
            str(crashed),
            crashed == 0,
        ),
        Check(
            "daemons that died on their own (pid: exit code)",
            str(len(chaos.daemon_exits)) + "".join(f" {p}: {c}" for p, c in chaos.daemon_exits),
            not chaos.daemon_exits,
        ),
        Check(
            "daemons that refused to start while Postgres restarted or was read-only",
            str(chaos.startup_refused),
            None,
        ),
        Check(
            "graceful stops that exited 0",
            f"{sum(c == 0 for _, c in chaos.graceful_stops)}/{len(chaos.graceful_stops)}",
            all(c == 0 for _, c in chaos.graceful_stops),
        ),
        Check(
            "stale completions attempted and rejected (chunk.fenced)",
            f"{len(fenced_logs)} ({sum(e.get('outcome') == 'completed' for e in fenced_logs)}"
            " completions, "
            f"{sum(e.get('outcome') == 'failed' for e in fenced_logs)} failures)",
            None,
        ),
        Check("executions", f"{len(executions)} for {len(by_queue)} chunks", None),
        Check("executions beyond one per chunk", str(extra), None),
    ]
    for reason, n in reasons.most_common():
        checks.append(Check(f"  {reason}", str(n), None))
    checks.append(
        Check("claims whose handler never started (claim reply lost)", str(never_started), None)
    )
    held = sum(len(k.held) for k in chaos.kills)
    if recoveries:
        recovery = (
            f"max {max(recoveries):.2f} s, p50 {statistics.median(recoveries):.2f} s "
            f"over {len(recoveries)} chunks held by {len(chaos.kills)} killed daemons"
        )
    else:
        recovery = f"n/a ({held} chunks held at kills)"
    checks.append(Check("time from a kill until its chunks ran again", recovery, None))
    if completed_by_dead:
        checks.append(
            Check(
                "  held chunks completed by a statement sent just before the kill",
                str(completed_by_dead),
                None,
            )
        )
    checks.append(
        Check(
            "  held chunks never run again after the kill (must be 0)",
            str(not_rerun),
            not_rerun == 0,
        )
    )
    checks.append(
        Check(
            "chaos: SIGKILLs / connections cut / Postgres restarts / SIGTERMs",
            f"{len(chaos.kills)} / {chaos.terminated_backends} / "
            f"{chaos.postgres_restarts} / {len(chaos.graceful_stops)}",
            None,
        )
    )
    checks.append(
        Check(
            "chaos: read-only windows / daemons frozen (SIGSTOP)",
            f"{0 if chaos.read_only is None else 1} / {0 if chaos.stalled is None else 1}",
            None,
        )
    )
    return checks


def _logged_at(event: dict[str, Any]) -> datetime:
    """When a daemon logged an event (its host's clock: the database's, here)."""
    try:
        return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return datetime.min.replace(tzinfo=UTC)


def _stall_checks(chaos: Chaos, logs: list[dict[str, Any]], ran_on: int) -> list[Check]:
    stall = chaos.stalled
    if stall is None:
        return []
    own = [e for e in logs if e["_pid"] == stall.daemon.pid and _logged_at(e) >= stall.stopped_at]
    stalls = [e.get("stalled_s") for e in own if e.get("event") == "event_loop.stalled"]
    lost = [e for e in own if e.get("event") == "chunk.lease_lost"]
    cancelled = sum(e.get("action") == "handler cancelled" for e in lost)
    return [
        Check(
            f"frozen daemon (pid {stall.daemon.pid}, {STALL_S:g} s): stall it logged / "
            "handlers it cancelled / claims it dropped, on resuming",
            f"{', '.join(f'{s:g} s' for s in stalls) or 'none'} / {cancelled} / "
            f"{len(lost) - cancelled}",
            None,
        ),
        Check(
            "  its handlers that ran on after SIGCONT, their chunk taken over (must be 0)",
            str(ran_on),
            ran_on == 0,
        ),
    ]


def _read_only_checks(chaos: Chaos, logs: list[dict[str, Any]]) -> list[Check]:
    if chaos.read_only is None:
        return []
    began, ended = chaos.read_only
    said = [e for e in logs if e.get("event") == "database.unwritable"]
    return [
        Check(
            f"read-only window ({(ended - began).total_seconds():.1f} s): daemons that said so "
            "in one line (database.unwritable)",
            f"{len({e['_pid'] for e in said})} daemons, {len(said)} lines",
            None,
        )
    ]


async def growing_checks(db: Db) -> list[Check]:
    """The continuation chain, the schedule and the job_finished events."""
    chain = await db.run(
        lambda c: c.fetch(
            "SELECT c.seq, (c.payload->>'page')::int AS page, (c.payload->>'last')::int AS last"
            " FROM chunkd.chunked_sync_jobs c JOIN chunkd.sync_jobs j ON j.id = c.sync_job_id"
            " WHERE j.kind = $1 ORDER BY c.seq",
            CHAIN_KIND,
        )
    )
    pages = chain[0]["last"] + 1 if chain else 0
    chain_ok = (
        [r["seq"] for r in chain] == list(range(pages))
        and all(r["page"] == r["seq"] for r in chain)
        and pages > 0
    )
    fires = await db.run(
        lambda c: c.fetch(
            "SELECT f.due_at, f.sync_job_id FROM chunkd.schedule_fires f"
            " JOIN chunkd.schedules s ON s.id = f.schedule_id WHERE s.name = $1",
            SCHEDULE,
        )
    )
    tick_jobs = await db.run(
        lambda c: c.fetchval("SELECT count(*) FROM chunkd.sync_jobs WHERE kind = $1", TICK_KIND)
    )
    due_times = [f["due_at"] for f in fires]
    fires_ok = (
        len(fires) > 0
        and tick_jobs == len(fires)
        and len({f["sync_job_id"] for f in fires}) == len(fires)
        and len(set(due_times)) == len(due_times)
        and all(t.second % 5 == 0 and t.microsecond == 0 for t in due_times)
    )
    span = (max(due_times) - min(due_times)).total_seconds() if due_times else 0.0
    announced = await db.run(
        lambda c: c.fetch(
            "SELECT j.finished_at IS NOT NULL AS finished, count(e.event) AS events"
            " FROM chunkd.sync_jobs j LEFT JOIN chunkd.job_events e"
            "   ON e.sync_job_id = j.id AND e.event = 'job_finished'"
            " GROUP BY j.id, j.finished_at"
        )
    )
    wrong = sum(1 for r in announced if r["events"] != (1 if r["finished"] else 0))
    return [
        Check(
            "continuation chain: every page appended once, seq without gap",
            f"{len(chain)} chunks for {pages} pages",
            chain_ok,
        ),
        Check(
            "schedule every 5 s: one job per fired due time, none twice",
            f"{len(fires)} fires over {span:.0f} s, {tick_jobs} jobs",
            fires_ok,
        ),
        Check(
            "jobs whose job_finished events are not exactly one per finish",
            f"{wrong} of {len(announced)}",
            wrong == 0,
        ),
    ]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _kill_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    try:
        low, high = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX seconds, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return low, high


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    p.add_argument(
        "--kill-every",
        type=_kill_range,
        default=(2.0, 5.0),
        help="SIGKILL a daemon every MIN-MAX seconds (default 2-5)",
    )
    p.add_argument("--chunks", type=int, default=10_000, help="chunks over 20 jobs (min 1000)")
    p.add_argument(
        "--converge-timeout",
        type=float,
        default=180.0,
        help="seconds allowed after the chaos for every chunk to finish",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the daemon logs even on success")
    args = p.parse_args(argv)
    if args.chunks < 1000:
        p.error("--chunks must be at least 1000")
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


async def soak(args: argparse.Namespace, cluster: PostgresCluster, work_dir: Path) -> bool:
    admin = await asyncpg.connect(cluster.dsn("postgres"))
    try:
        await admin.execute("CREATE DATABASE chaos")
    finally:
        await admin.close()
    dsn = cluster.dsn("chaos")
    setup = await asyncpg.connect(dsn)
    try:
        await apply_migrations(setup)
        await setup.execute(EXECUTIONS_DDL)
    finally:
        await setup.close()

    db = Db(dsn)
    fleet = Fleet(dsn, work_dir)
    mix = Mix(KIND, MAX_ATTEMPTS, random.Random(args.seed + 1))
    try:
        for _ in range(DAEMONS):
            fleet.start()
        began = time.monotonic()
        chaos = await run_chaos(args, cluster, dsn, db, fleet, mix)
        say(
            f"chaos over after {time.monotonic() - began:.1f}s; converging "
            f"(bound {args.converge_timeout:g}s)"
        )
        await replace_dead(fleet, chaos, db)
        converge_start = time.monotonic()
        converged = False
        next_sample = 0.0
        while time.monotonic() - converge_start < args.converge_timeout:
            if time.monotonic() >= next_sample:
                await sample_stuck(db, chaos)
                next_sample = time.monotonic() + 1.0
            if await unfinished(db) == 0:
                converged = True
                break
            await asyncio.sleep(0.25)
        say(
            f"converged in {time.monotonic() - converge_start:.1f}s"
            if converged
            else "did NOT converge"
        )
        for daemon in fleet.running:  # graceful: flushes the logs, deregisters
            # One started late in the chaos may not be up yet: a SIGTERM before its signal
            # handlers exist just kills it (-15, as systemd's stop would, which counts that as
            # a clean stop). Each is given until it is ready, or has exited, to be stopped.
            await _until_up(daemon, READY_WAIT_S)
            code = await fleet.sigterm(daemon, db)
            if code != 0:
                chaos.daemon_exits.append((daemon.pid, code))
        checks = await analyse(db, chaos, fleet, converged, mix)
    finally:
        fleet.kill_all()
        await db.close()

    width = max(len(c.name) for c in checks) + 2
    say("")
    say(
        f"chunkd chaos soak: {args.duration:g}s, kill every {args.kill_every[0]:g}-"
        f"{args.kill_every[1]:g}s, {DAEMONS} daemons x {CONCURRENCY}, {args.chunks} chunks in "
        f"{JOBS} jobs ({LIMITED_JOBS} with max_concurrency = 1), fsync on, seed {args.seed}"
    )
    say(f"beside them: {mix.describe()}")
    for c in checks:
        mark = "" if c.ok is None else ("  OK" if c.ok else "  FAILED")
        say(f"{c.name.ljust(width, '.')} {c.value}{mark}")
    ok = all(c.ok is not False for c in checks)
    say("RESULT: PASS" if ok else "RESULT: FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="chunkd-chaos-"))
    try:
        cluster = PostgresCluster(fsync=True)
        cluster.start()
    except ClusterError as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    ok = False
    try:
        ok = asyncio.run(soak(args, cluster, work_dir))
    finally:
        cluster.cleanup()
        if ok and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            say(f"daemon logs kept in {work_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
