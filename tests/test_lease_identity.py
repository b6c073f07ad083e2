"""A lease is (chunk, attempt), not (chunk, worker) (docs/guarantees.md, "Leases").

The issue's input (K13): the database host's clock stepped forward by more than the remaining
lease while a chunk of a ``max_concurrency = 1`` job ran (libfaketime on the server: +20 s
against a 15 s lease). The daemon's own reaper reaped its chunk, its claimer claimed it again
as attempt 2, and attempt 1's handler was never cancelled: two executions of one chunk side by
side for 7.7 s (renewals matched (chunk, worker), and the in-flight map was keyed by chunk).

Also: a daemon silent in the workers registry for three heartbeats has its chunks returned
without waiting for each lease, and rows of daemons gone for long are pruned.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster
from daemon_helpers import Daemon, wait_until
from fault_handlers import EXECUTIONS_DDL
from resources import faketime_library
from sql_helpers import claim, create_job, expire_leases

STEPS = "test=fault_handlers:steps"


def _overlap_s(executions: list[asyncpg.Record]) -> float:
    """How long two executions of the same chunk ran side by side, at most (seconds)."""
    worst = 0.0
    for i, a in enumerate(executions):
        for b in executions[i + 1 :]:
            if a["queue_id"] != b["queue_id"]:
                continue
            ends = [e["ended_at"] for e in (a, b) if e["ended_at"] is not None]  # None: running
            end = min(ends)
            worst = max(worst, (end - max(a["started_at"], b["started_at"])).total_seconds())
    return worst


def _offset_file() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="chunkd-faketime-"))
    folder.chmod(0o755)
    offset = folder / "offset"
    offset.write_text("+0s\n")
    offset.chmod(0o644)
    return offset


@pytest.fixture
async def stepped_server() -> AsyncIterator[tuple[str, Path]]:
    """A PostgreSQL whose clock libfaketime shifts by what ``offset`` holds (read at every
    call), migrated: (its DSN, the offset file). The file lives where the server's user can
    read it (pytest's tmp_path may not be)."""
    library = faketime_library()  # under CI a missing libfaketime fails this test
    offset = _offset_file()
    folder = offset.parent
    cluster = PostgresCluster(
        port=55000 + uuid.uuid4().int % 5000,
        extra_env={
            "LD_PRELOAD": str(library),
            "FAKETIME_TIMESTAMP_FILE": str(offset),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    cluster.init()
    cluster.start()
    try:
        dsn = cluster.dsn()
        conn = await connect(dsn)
        try:
            await apply_migrations(conn)
            await conn.execute(EXECUTIONS_DDL)
        finally:
            await conn.close()
        yield dsn, offset
    finally:
        cluster.stop()
        cluster.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_clock_step_on_the_database_host_never_runs_a_chunk_twice_at_once(
    stepped_server: tuple[str, Path], tmp_path: Path
) -> None:
    dsn, offset = stepped_server
    conn = await connect(dsn)
    daemon = None
    try:
        job = await create_job(conn, [{"steps": 100, "step_s": 0.1}] * 2, max_concurrency=1)
        daemon = Daemon(
            dsn, tmp_path / "daemon.log", "--handler", STEPS, "--lease", "15s",
            "--reap-interval", "300ms", env={"FAULT_DSN": dsn},
        )  # fmt: skip
        await wait_until(
            lambda: conn.fetchrow("SELECT * FROM public.fault_executions"),
            timeout_s=20,
            what="chunk 0 to start",
        )
        await asyncio.sleep(1)
        await asyncio.to_thread(offset.write_text, "+20s\n")  # the input: a 20 s step
        await wait_until(
            lambda: conn.fetchval(
                "SELECT count(*) >= 2 FROM public.fault_executions WHERE seq = 0"
            ),
            timeout_s=30,
            what="chunk 0 to be claimed again (its lease gone by the database clock)",
        )
        await daemon.wait_for_event("clock.step", timeout_s=20)
        await wait_until(
            lambda: conn.fetchval(
                "SELECT bool_and(ended_at IS NOT NULL) FROM public.fault_executions"
                " WHERE seq = 0 AND attempt = 1"
            ),
            timeout_s=10,
            what="attempt 1's handler to stop",
        )
        executions = await conn.fetch(
            "SELECT * FROM public.fault_executions WHERE seq = 0 ORDER BY started_at"
        )
        first, second = executions[0], executions[1]
        assert (first["attempt"], second["attempt"]) == (1, 2)
        assert first["cancelled"], "attempt 1's handler was cancelled"
        # Stopped at once: when its chunk was reaped or claimed again, not 7.7 s later.
        assert (first["ended_at"] - second["started_at"]).total_seconds() < 0.5, executions
        step = next(e for e in daemon.events() if e["event"] == "clock.step")
        assert 19 < step["step_s"] < 21, step
        lost = [e for e in daemon.events() if e["event"] == "chunk.lease_lost"]
        assert lost and lost[0]["attempt"] == 1, lost
        assert await daemon.stop() == 0
        del job
    finally:
        if daemon is not None:
            daemon.kill()
        await conn.close()


async def _attempts(conn: asyncpg.Connection) -> list[tuple[int, int, str | None, str | None]]:
    """(seq, attempt, outcome, error) of every attempt, in order."""
    rows = await conn.fetch(
        "SELECT c.seq, a.attempt, a.outcome, a.error FROM chunkd.attempts a"
        " JOIN chunkd.chunks c ON c.id = a.chunk_id ORDER BY c.seq, a.n"
    )
    return [(r["seq"], r["attempt"], r["outcome"], r["error"]) for r in rows]


async def test_a_clock_step_spends_one_attempt_of_the_chunk_in_flight_and_no_more(
    stepped_server: tuple[str, Path], tmp_path: Path
) -> None:
    """Issue #21, F1, the walkthrough's input: a +20 s step of the database clock against a
    15 s lease (registry heartbeat every 5 s), the reaper every 300 ms, a `max_concurrency = 1`
    job of two 10 s chunks. The daemon, taken for dead until its next heartbeat, had every
    claim it made after the step reaped on the next pass: both chunks failed after three
    attempts within 1.8 s ("worker stopped heartbeating"). Now only the attempt in flight at
    the step is reaped; the job completes."""
    dsn, offset = stepped_server
    conn = await connect(dsn)
    daemon = None
    try:
        job = await create_job(conn, [{"steps": 100, "step_s": 0.1}] * 2, max_concurrency=1)
        daemon = Daemon(
            dsn, tmp_path / "daemon.log", "--handler", STEPS, "--lease", "15s",
            "--reap-interval", "300ms", env={"FAULT_DSN": dsn},
        )  # fmt: skip
        await wait_until(
            lambda: conn.fetchrow("SELECT * FROM public.fault_executions"),
            timeout_s=20,
            what="chunk 0 to start",
        )
        await asyncio.sleep(1)  # the input: the step comes 1 s into chunk 0
        await asyncio.to_thread(offset.write_text, "+20s\n")
        await wait_until(
            lambda: conn.fetchval(
                "SELECT finished_at IS NOT NULL FROM chunkd.sync_jobs WHERE id = $1", job
            ),
            timeout_s=60,
            what="the job to finish",
        )
        assert await _attempts(conn) == [
            (0, 1, "reaped", "lease expired"),
            (0, 2, "completed", None),
            (1, 1, "completed", None),
        ]
        reaped = [e for e in daemon.events() if e["event"] == "chunk.reaped"]
        assert [(e["seq"], e["attempt"], e["reason"]) for e in reaped] == [
            (0, 1, "its lease had run out")
        ]
        # Its handler stopped once, for the reap or for the claim that followed it, whichever
        # of the two reached it first.
        lost = [e for e in daemon.events() if e["event"] == "chunk.lease_lost"]
        assert [e["attempt"] for e in lost] == [1], lost
        assert lost[0]["reason"] in (
            "the reaper returned the chunk (its lease had run out)",
            "this daemon claimed the chunk again (attempt 2)",
        )
        assert await daemon.stop() == 0
    finally:
        if daemon is not None:
            daemon.kill()
        await conn.close()


async def test_a_claim_reaped_for_missed_heartbeats_says_so_and_the_claims_after_it_run(
    conn, database, start
) -> None:
    """The registry rule, through a real daemon: its heartbeat and its claim moved 20 s into
    the past, as a +20 s step of the database clock leaves them (its 60 s lease still runs).
    Its reaper reaps the claim for the missed heartbeats and says so (not "its lease had run
    out"); the claim it makes next, after the step, is not reaped before its next heartbeat.
    The job is paused meanwhile, so that the handler learns of the reap from the reaper, not
    from a claim of the chunk again."""
    await conn.execute(EXECUTIONS_DDL)
    job = await create_job(conn, [{"steps": 70, "step_s": 0.1}])  # outlasts the heartbeat wait
    daemon = start(
        "--handler", STEPS, "--lease", "60s", "--reap-interval", "200ms",
        env={"FAULT_DSN": database.dsn},
    )  # fmt: skip
    await wait_until(
        lambda: conn.fetchrow("SELECT * FROM public.fault_executions"),
        timeout_s=20,
        what="the handler to start",
    )
    await conn.execute("SELECT chunkd.pause_sync_job($1)", job)  # the running chunk runs on
    beat = await conn.fetchval("SELECT last_heartbeat_at FROM chunkd.workers")
    await wait_until(  # right after a heartbeat: the next is 5 s away
        lambda: conn.fetchval("SELECT last_heartbeat_at > $1 FROM chunkd.workers", beat),
        timeout_s=10,
        what="a heartbeat",
    )
    async with conn.transaction():
        await conn.execute(
            "UPDATE chunkd.workers SET last_heartbeat_at = last_heartbeat_at - interval '20 s'"
        )
        await conn.execute(
            "UPDATE chunkd.attempts SET claimed_at = claimed_at - interval '20 s',"
            " lease_expires_at = lease_expires_at - interval '20 s' WHERE ended_at IS NULL"
        )
    lost = await daemon.wait_for_event("chunk.lease_lost", timeout_s=10)
    assert lost["reason"] == "the reaper returned the chunk (its worker missed 3 heartbeats)"
    await conn.execute("SELECT chunkd.resume_sync_job($1)", job)
    await wait_until(
        lambda: conn.fetchval(
            "SELECT finished_at IS NOT NULL FROM chunkd.sync_jobs WHERE id = $1", job
        ),
        timeout_s=20,
        what="attempt 2 to run to its end",
    )
    assert await _attempts(conn) == [
        (0, 1, "reaped", "worker stopped heartbeating"),
        (0, 2, "completed", None),
    ]
    reaped = [e for e in daemon.events() if e["event"] == "chunk.reaped"]
    assert [e["reason"] for e in reaped] == ["its worker missed 3 heartbeats"]
    assert await daemon.stop() == 0


async def test_a_claim_reaped_under_its_daemon_is_cancelled_and_renewals_name_the_attempt(
    conn, database, start
) -> None:
    """The same kind without a clock: the lease is moved into the past by hand (as a step
    does), the daemon's reaper returns the chunk, and the older attempt stops at once."""
    await conn.execute(EXECUTIONS_DDL)
    await create_job(conn, [{"steps": 60, "step_s": 0.1}], max_concurrency=1)
    daemon = start(
        "--handler", STEPS, "--lease", "30s", "--reap-interval", "200ms",
        env={"FAULT_DSN": database.dsn},
    )  # fmt: skip
    await wait_until(
        lambda: conn.fetchrow("SELECT * FROM public.fault_executions"),
        timeout_s=20,
        what="the handler to start",
    )
    await expire_leases(conn)
    await wait_until(
        lambda: conn.fetchval("SELECT count(*) >= 2 FROM public.fault_executions"),
        timeout_s=20,
        what="the chunk to be claimed again",
    )
    await wait_until(
        lambda: conn.fetchval(
            "SELECT ended_at IS NOT NULL FROM public.fault_executions WHERE attempt = 1"
        ),
        timeout_s=10,
        what="attempt 1 to stop",
    )
    executions = await conn.fetch("SELECT * FROM public.fault_executions ORDER BY started_at")
    assert _overlap_s(executions) < 0.5, executions
    assert await daemon.stop() == 0


async def test_renewals_and_releases_name_the_attempt(conn) -> None:
    """SQL alone: a worker that held attempt 1 (reaped) and holds attempt 2 of the same chunk
    renews only the attempt it names."""
    await create_job(conn, 1, kind="ident")
    (first,) = await claim(conn, "w", 1, kinds=["ident"])
    await expire_leases(conn)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
    (second,) = await claim(conn, "w", 1, kinds=["ident"])
    assert (first["attempt"], second["attempt"]) == (1, 2)
    chunk = await conn.fetchval(
        "SELECT id FROM chunkd.chunks WHERE queue_id = $1", second["queue_id"]
    )
    renewed = await conn.fetch(
        "SELECT * FROM chunkd.renew_attempts('w', $1, $2, 60)", [chunk, chunk], [1, 2]
    )
    assert [(r["id"], r["attempt"]) for r in renewed] == [(chunk, 2)]


async def test_a_killed_daemons_chunks_come_back_after_three_missed_heartbeats(
    conn, database, start
) -> None:
    """A daemon killed with a 60 s lease: its chunk returns in about three heartbeats (5 s
    each), not a whole lease; its registry row goes once it has been silent long enough."""
    await conn.execute(EXECUTIONS_DDL)
    await create_job(conn, [{"steps": 30, "step_s": 0.1}])
    victim = start("--handler", STEPS, "--lease", "60s", env={"FAULT_DSN": database.dsn})
    await wait_until(
        lambda: conn.fetchrow("SELECT * FROM public.fault_executions"),
        timeout_s=20,
        what="the handler to start",
    )
    assert await conn.fetchval("SELECT heartbeat_s FROM chunkd.workers") == 5.0
    victim.signal(signal.SIGKILL)
    killed_at = await conn.fetchval("SELECT clock_timestamp()")
    rescuer = start(
        "--handler", STEPS, "--lease", "60s", "--reap-interval", "500ms",
        env={"FAULT_DSN": database.dsn},
    )  # fmt: skip
    reaped = await rescuer.wait_for_event("chunk.reaped", timeout_s=40)
    reaped_at = await conn.fetchval(
        "SELECT max(ended_at) FROM chunkd.attempts WHERE outcome = 'reaped'"
    )
    assert (reaped_at - killed_at).total_seconds() < 25, "three heartbeats and a reap, not 60 s"
    assert reaped["worker_id"] != reaped["reaped_by"]
    error = await conn.fetchval("SELECT error FROM chunkd.attempts WHERE outcome = 'reaped'")
    assert error == "worker stopped heartbeating"
    # A row of a daemon gone for an hour, holding nothing, is pruned by the reaper's loop.
    await conn.execute(
        "INSERT INTO chunkd.workers (worker_id, host, pid, version, kinds, concurrency,"
        " last_heartbeat_at) VALUES ('gone:1:x', 'gone', 1, '0.2.0', '{test}', 1,"
        " now() - interval '1 hour')"
    )
    await wait_until(
        lambda: conn.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM chunkd.workers WHERE worker_id = 'gone:1:x')"
        ),
        timeout_s=10,
        what="the old row to be pruned",
    )
    assert await rescuer.stop() == 0
