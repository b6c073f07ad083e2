"""Delayed jobs with a real ``chunkd run``: an idle daemon starts them on its timer, within
100 ms of ``run_at`` (database clock), never before it, and never waiting for the 60 s poll."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta

import asyncpg

from daemon_helpers import wait_until
from enqueue_helpers import db_time, enqueue, overall_status

RECORD = "test=daemon_handlers:record"
IDLE = ["--handler", RECORD, "--poll-interval", "60s"]
ON_TIME = timedelta(milliseconds=100)


async def _first_claim(conn: asyncpg.Connection, job: uuid.UUID) -> datetime:
    async def done() -> bool:
        return await overall_status(conn, job) == "completed"

    await wait_until(done, timeout_s=15, what=f"delayed job {job}")
    return await conn.fetchval(
        "SELECT min(a.claimed_at) FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id"
        " WHERE j.public_id = $1",
        job,
    )


async def test_delayed_jobs_start_within_100ms_of_run_at_on_an_idle_daemon(conn, start) -> None:
    from daemon_handlers import EXECUTIONS_DDL

    await conn.execute(EXECUTIONS_DDL)
    daemon = start(*IDLE)
    await daemon.wait_for_event("daemon.ready")
    for delay_s in (1.0, 0.4, 1.5):
        run_at = await db_time(conn, delay_s)
        job = await enqueue(conn, 3, kind="test", run_at=run_at)
        started = await _first_claim(conn, job)
        assert run_at <= started < run_at + ON_TIME, (delay_s, started - run_at)


async def test_the_delay_counts_from_the_producers_commit(conn, start) -> None:
    """A producer that enqueues, then works on in its transaction for a second: the daemon
    still starts the job on time (its wake-up is sent, and counted, at the commit)."""
    from daemon_handlers import EXECUTIONS_DDL

    await conn.execute(EXECUTIONS_DDL)
    daemon = start(*IDLE)
    await daemon.wait_for_event("daemon.ready")
    async with conn.transaction():
        run_at = await db_time(conn, 2.0)
        job = await enqueue(conn, 1, kind="test", run_at=run_at)
        await asyncio.sleep(1.0)  # the producer's own work, inside its transaction
    started = await _first_claim(conn, job)
    assert run_at <= started < run_at + ON_TIME, started - run_at


async def test_enqueue_in_from_the_cli_starts_by_the_database_clock(database, conn, start) -> None:
    from daemon_handlers import EXECUTIONS_DDL

    await conn.execute(EXECUTIONS_DDL)
    daemon = start(*IDLE)
    await daemon.wait_for_event("daemon.ready")
    env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    before = await db_time(conn)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chunkd", "enqueue", "--kind", "test", "--in", "1500ms", "-"],
        input="[{}, {}]",
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "CHUNKD_DSN": database.dsn},
    )
    assert done.returncode == 0, done.stderr
    job = uuid.UUID(done.stdout.strip())
    run_at = await conn.fetchval("SELECT run_at FROM chunkd.sync_jobs WHERE id = $1", job)
    assert timedelta(seconds=1.5) <= run_at - before < timedelta(seconds=3)
    started = await _first_claim(conn, job)
    assert run_at <= started < run_at + ON_TIME, started - run_at
