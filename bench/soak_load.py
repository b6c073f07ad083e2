"""The soak's moving parts (bench/soak.py): ``chunkd run`` daemons, the open-loop producer,
the no-op capacity measurement, the held snapshot, and retention (or its stand-in).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import soak_db

import chunkd
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster

BENCH_DIR = Path(__file__).resolve().parent
KIND = "soak"
HOLD_SQL = "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;"


async def fresh_db(cluster: PostgresCluster, name: str) -> str:
    """A new database ``name`` (dropped first if there), migrated; its DSN."""
    admin = await connect(cluster.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await connect(cluster.dsn(name))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return cluster.dsn(name)


async def drop_db(cluster: PostgresCluster, name: str) -> None:
    """Drop ``name`` and CHECKPOINT, so what follows does not pay for its dirty pages."""
    admin = await connect(cluster.dsn("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute("CHECKPOINT")
    finally:
        await admin.close()


async def close(conn: Any) -> None:
    """Close, or terminate when that does not finish within 5 s (a cancelled call)."""
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:
        conn.terminate()


class Fleet:
    """N ``chunkd run`` processes, logs in ``work_dir``; ``extra``: more ``run`` options."""

    def __init__(
        self,
        dsn: str,
        work_dir: Path,
        count: int,
        handler: str,
        concurrency: int,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[TextIO] = []
        env = dict(os.environ, CHUNKD_DSN=dsn, PYTHONPATH=str(BENCH_DIR))
        for n in range(count):
            log = open(work_dir / f"daemon-{handler.split(':')[1]}-{n}.log", "w")
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "chunkd.cli",
                        "--log-level",
                        "warning",
                        "run",
                        "--handler",
                        f"{KIND}={handler}",
                        "--concurrency",
                        str(concurrency),
                        *extra,
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    async def wait_registered(self, conn: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while await conn.fetchval("SELECT count(*) FROM chunkd.workers") < len(self.procs):
            if time.monotonic() > deadline or self.exited():
                raise RuntimeError(f"daemons not registered: {self.exited() or 'timeout'}")
            await asyncio.sleep(0.1)

    def exited(self) -> list[str]:
        return [f"pid {p.pid} exit {p.returncode}" for p in self.procs if p.poll() is not None]

    def stop(self) -> list[str]:
        """SIGTERM each; a non-zero exit is reported (a kill after 60 s too)."""
        died = self.exited()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                died.append(f"pid {p.pid} killed after 60 s")
        for log in self.logs:
            log.close()
        return died


async def enqueue(conn: Any, first: int, jobs: int, per_job: int) -> None:
    """``jobs`` jobs of ``per_job`` chunks numbered from ``first``, in one call."""
    specs = [
        {"kind": KIND, "chunks": [{"i": first + j * per_job + k} for k in range(per_job)]}
        for j in range(jobs)
    ]
    ids = await chunkd.create_sync_jobs(conn, specs)
    if len(ids) != jobs:
        raise RuntimeError(f"create_sync_jobs returned {len(ids)} ids for {jobs} jobs")


@dataclass
class Producer:
    """Open loop: every tick it enqueues the jobs its schedule (``rate`` chunks/s from
    ``start``) calls for by now, whatever the queue does; behind schedule, it sends calls of
    ``max_batch`` jobs back to back until it has caught up. One connection, one call at a
    time: chunk ids then grow in commit order, which the accounting scan relies on. How late
    each call committed against the schedule is recorded (``lag_s``, the worst)."""

    dsn: str
    rate: float  # chunks per second
    per_job: int
    tick_s: float = 0.05
    max_batch: int = 1000  # jobs per call, as the client's docs advise for bulk enqueues
    jobs: int = 0
    lag_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return self.jobs * self.per_job

    def scheduled(self, elapsed_s: float) -> int:
        """Chunks the schedule calls for after ``elapsed_s`` (whole jobs)."""
        return int(elapsed_s * self.rate / self.per_job) * self.per_job

    def behind_s(self, start: float, duration_s: float) -> float:
        """How far behind its schedule the producer is now, in seconds of it."""
        return max(0.0, min(time.monotonic() - start, duration_s) - self.chunks / self.rate)

    async def run(self, start: float, duration_s: float, stop: asyncio.Event) -> None:
        """Until the schedule's end is enqueued (or ``stop``)."""
        conn = await connect(self.dsn, application_name="chunkd-soak-producer")
        try:
            while not stop.is_set():
                now = time.monotonic()
                due = self.scheduled(min(now - start, duration_s)) // self.per_job - self.jobs
                if due > 0:
                    batch = min(due, self.max_batch)
                    try:
                        await enqueue(conn, self.chunks, batch, self.per_job)
                    except Exception as exc:  # reported as a failed check, the soak goes on
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        if conn.is_closed():
                            conn = await connect(self.dsn, application_name="chunkd-soak-producer")
                        await asyncio.sleep(self.tick_s)
                        continue
                    # How late the first of these committed, against its place in the schedule.
                    first_due_s = (self.jobs + 1) * self.per_job / self.rate
                    self.lag_s = max(self.lag_s, time.monotonic() - start - first_due_s)
                    self.jobs += batch
                    if batch < due:
                        continue  # behind: the next call at once
                elif now - start >= duration_s:
                    return
                await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - now)))
        finally:
            await close(conn)


@dataclass
class Capacity:
    per_s: float
    ran_dry: int  # measurements that found the backlog empty: the producer was the limit


async def measure_capacity(
    dsn: str, work_dir: Path, daemons: int, concurrency: int, per_job: int, seconds: float
) -> Capacity:
    """No-op chunks/s of ``daemons`` x ``concurrency`` on one-chunk (or ``per_job``) jobs,
    while a producer on the same machine keeps a backlog of at least 20,000 chunks (from its
    own connection, 2,000 chunks a call): what the soak's setup sustains, enqueueing included.
    """
    backlog, batch = 20_000, max(1, 2_000 // per_job)
    feeder = await connect(dsn, application_name="chunkd-soak-capacity-feeder")
    conn = await connect(dsn, application_name="chunkd-soak-capacity")
    produced = 0
    stop = asyncio.Event()

    async def feed() -> None:
        nonlocal produced
        while not stop.is_set():
            if await feeder.fetchval("SELECT count(*) FROM chunkd.ready") >= backlog:
                await asyncio.sleep(0.05)
                continue
            await enqueue(feeder, produced, batch, per_job)
            produced += batch * per_job

    async def completed() -> int:
        sql = "SELECT count(*) FROM chunkd.attempts WHERE outcome = 'completed'"
        return int(await conn.fetchval(sql))

    while produced < 2 * backlog:  # before the daemons start
        await enqueue(feeder, produced, batch, per_job)
        produced += batch * per_job
    fleet = Fleet(dsn, work_dir, daemons, "bench_handlers:noop", concurrency)
    feeding = asyncio.create_task(feed())
    ran_dry = 0
    try:
        await fleet.wait_registered(conn)
        await asyncio.sleep(min(5.0, seconds))  # warm-up
        done0, t0 = await completed(), time.monotonic()
        done1, t1 = done0, t0
        while t1 < t0 + seconds:
            await asyncio.sleep(0.5)
            if feeding.done():
                feeding.result()  # the feeder's error, if any
            ran_dry += not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM chunkd.ready)")
            done1, t1 = await completed(), time.monotonic()
        if fleet.exited():
            raise RuntimeError(f"a daemon stopped while measuring capacity: {fleet.exited()}")
        return Capacity((done1 - done0) / (t1 - t0), ran_dry)
    finally:
        stop.set()
        fleet.stop()
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        await close(conn)
        await close(feeder)


class Holder:
    """A session holding a REPEATABLE READ snapshot idle in transaction."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None
        self.started = 0.0
        self.releasing = False
        self.info: dict[str, Any] = {}

    @property
    def holding(self) -> bool:
        return self.conn is not None and not self.releasing

    async def hold(self, observer: Any) -> None:
        self.conn = await connect(self.dsn, application_name="chunkd-soak-snapshot-holder")
        await self.conn.execute(HOLD_SQL)
        self.started = time.monotonic()
        state = await soak_db.holder_state(observer, self.conn.get_server_pid())
        self.info = {"xmin": state["xmin"], "state": state["state"]}

    async def release(self, observer: Any) -> None:
        self.releasing = True
        state = await soak_db.holder_state(observer, self.conn.get_server_pid())
        self.info.update(
            xmin_after=state["xmin"],
            state_after=state["state"],
            held_s=time.monotonic() - self.started,
        )
        await self.conn.execute("ROLLBACK")
        await self.conn.close()
        self.conn = None

    async def drop(self) -> None:
        """After an error: let go of the snapshot at once, if still held."""
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None


class StandInPurge:
    """Without retention in the schema: ``chunkd.purge_finished_jobs(retention)`` every
    ``every_s`` from its own connection. A stand-in, said so in the output."""

    def __init__(self, dsn: str, retention_s: float, every_s: float) -> None:
        self.dsn, self.retention_s, self.every_s = dsn, retention_s, every_s
        self.purged = 0
        self.errors: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        conn = await connect(self.dsn, application_name="chunkd-soak-purge")
        try:
            while not stop.is_set():
                try:
                    self.purged += await soak_db.purge(conn, self.retention_s)
                except Exception as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                try:
                    await asyncio.wait_for(stop.wait(), self.every_s)
                except TimeoutError:
                    pass
        finally:
            await close(conn)
