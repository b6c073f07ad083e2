"""``chunkd run`` as a real subprocess: every test asserts what ended up in the database."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from datetime import timedelta

import asyncpg
import pytest

from chunkd.db import connect
from daemon_helpers import wait_until
from sql_helpers import claim, complete, create_job, status_counts

RECORD = "test=daemon_handlers:record"
FAST = ["--reap-interval", "500ms", "--retry-base", "100ms", "--retry-cap", "1s"]


async def _completed(conn: asyncpg.Connection, total: int):
    async def check() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM chunkd.chunk_processing_queue WHERE status = 'completed'"
        )
        return n == total

    return check


async def _terminal(conn: asyncpg.Connection, job) -> bool:
    counts = await status_counts(conn, job)
    return not counts.get("pending") and not counts.get("processing")


async def test_three_jobs_of_300_each_complete_exactly_once(db, start) -> None:
    jobs = [await create_job(db, [{"sleep_s": 0.002}] * 300) for _ in range(3)]
    daemon = start("--handler", RECORD, "--concurrency", "20")
    await wait_until(await _completed(db, 900), timeout_s=60, what="900 completions")
    runs = await db.fetch(
        "SELECT chunk_id, count(*) AS n FROM public.test_executions GROUP BY chunk_id"
    )
    assert len(runs) == 900 and {r["n"] for r in runs} == {1}
    for job in jobs:
        assert await status_counts(db, job) == {"completed": 300}
    results = await db.fetch("SELECT seq, result FROM chunkd.chunk_processing_queue")
    assert all(r["result"] == {"seq": r["seq"], "attempt": 1} for r in results)
    assert await daemon.stop() == 0
    events = daemon.events()  # every line must be JSON
    completed = [e for e in events if e["event"] == "chunk.completed"]
    assert len(completed) == 900
    for key in ("sync_job_id", "chunk_id", "seq", "attempt", "worker_id", "duration_ms"):
        assert all(key in e for e in completed), key
    assert await db.fetchval("SELECT count(*) FROM chunkd.workers") == 0, "deregistered"


async def test_limited_job_runs_in_seq_order_without_overlap_beside_a_parallel_job(
    db, start
) -> None:
    limited = await create_job(db, [{"sleep_s": 0.01}] * 30, max_concurrency=1)
    parallel = await create_job(db, [{"sleep_s": 0.05}] * 60)
    start("--handler", RECORD, "--concurrency", "10")
    await wait_until(await _completed(db, 90), timeout_s=60, what="90 completions")
    runs = await db.fetch(
        "SELECT seq, started_at, ended_at FROM public.test_executions WHERE job_id = $1"
        " ORDER BY started_at",
        limited,
    )
    assert [r["seq"] for r in runs] == list(range(30))
    for before, after in itertools.pairwise(runs):
        assert before["ended_at"] <= after["started_at"], "limited chunks overlapped"
    # The parallel job really ran beside it: some of its chunks overlapped the limited window.
    window = (runs[0]["started_at"], runs[-1]["ended_at"])
    beside = await db.fetchval(
        "SELECT count(*) FROM public.test_executions WHERE job_id = $1 AND started_at < $3"
        " AND ended_at > $2",
        parallel,
        *window,
    )
    assert beside > 5
    max_parallel = await db.fetchval(
        """SELECT max(n) FROM (
               SELECT (SELECT count(*) FROM public.test_executions o
                       WHERE o.job_id = e.job_id AND o.started_at <= e.started_at
                         AND o.ended_at > e.started_at) AS n
               FROM public.test_executions e WHERE e.job_id = $1) x""",
        parallel,
    )
    assert max_parallel > 1


async def test_failures_retry_with_backoff_then_fail_permanent_and_retry_later(db, start) -> None:
    always = await create_job(db, [{"fail": "always"}], max_attempts=3)
    permanent = await create_job(db, [{"fail": "permanent"}], max_attempts=3)
    later = await create_job(db, [{"fail": "retry_later", "delay_s": 1}], max_attempts=3)
    timeout = await create_job(db, [{"fail": "hang"}], max_attempts=3)
    start("--handler", RECORD, "--chunk-timeout", "500ms", *FAST, "--retry-base", "200ms")
    for job in (always, permanent, later, timeout):
        await wait_until(lambda job=job: _terminal(db, job), timeout_s=30, what=f"job {job}")

    row = await db.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", always
    )
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert row["error_message"] == "RuntimeError: planned failure on attempt 3"
    starts = [
        r["started_at"]
        for r in await db.fetch(
            "SELECT started_at FROM public.test_executions WHERE job_id = $1 ORDER BY attempt",
            always,
        )
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    # base 200ms: gap 1 in [0.1, 0.2]s, gap 2 in [0.2, 0.4]s, plus claim latency.
    assert 0.1 <= gaps[0] <= 0.6 and 0.2 <= gaps[1] <= 0.9, gaps

    row = await db.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", permanent
    )
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "planned permanent failure" in row["error_message"]

    runs = await db.fetch(
        "SELECT attempt, started_at FROM public.test_executions WHERE job_id = $1"
        " ORDER BY started_at",
        later,
    )
    assert [r["attempt"] for r in runs] == [1, 1], "a RetryLater snoozes: no attempt spent"
    gap = (runs[1]["started_at"] - runs[0]["started_at"]).total_seconds()
    assert 0.95 <= gap <= 2.0, gap
    assert await status_counts(db, later) == {"completed": 1}

    row = await db.fetchrow(
        "SELECT * FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", timeout
    )
    assert (row["status"], row["attempts"]) == ("completed", 2)
    event = await db.fetchrow(
        "SELECT * FROM chunkd.chunk_events WHERE sync_job_id = $1 AND event = 'retry_scheduled'",
        timeout,
    )
    assert event["error"] == "timed out after 0.5s"


async def test_future_retry_starts_on_the_timer_not_the_poll(db, start) -> None:
    job = await create_job(db, 1)
    # Someone else holds the chunk while the daemon starts, so its start-up poll finds nothing.
    (row,) = await claim(db, "someone-else", 1)
    daemon = start("--handler", RECORD, "--poll-interval", "60s")
    await daemon.wait_for_event("daemon.ready")
    # A retry 2 s ahead: the only NOTIFY is sent now, with the delay as its payload.
    failed_at = time.monotonic()
    await db.fetchval(
        "SELECT chunkd.fail_chunk_job_safe($1, 'someone-else', 1, 'x', true, $2)",
        row["queue_id"],
        timedelta(seconds=2),
    )
    await wait_until(lambda: _terminal(db, job), timeout_s=10, what="the retried chunk")
    waited = time.monotonic() - failed_at
    assert 1.9 <= waited <= 4.0, f"started after {waited:.2f}s (timer 2 s, poll 60 s)"


async def test_handler_longer_than_lease_keeps_its_chunk(db, start) -> None:
    job = await create_job(db, [{"sleep_s": 4}])
    start("--handler", RECORD, "--lease", "1500ms", "--reap-interval", "200ms")
    await wait_until(lambda: _terminal(db, job), timeout_s=20, what="the long chunk")
    assert await status_counts(db, job) == {"completed": 1}
    assert await db.fetchval("SELECT count(*) FROM public.test_executions") == 1
    reaped = await db.fetchval("SELECT count(*) FROM chunkd.chunk_events WHERE event = 'reaped'")
    assert reaped == 0


async def test_sigkill_one_of_two_daemons_survivor_reaps_and_finishes(db, start) -> None:
    job = await create_job(db, [{"sleep_s": 0.5}] * 40)
    args = ["--handler", RECORD, "--lease", "2s", "--reap-interval", "300ms", "--concurrency", "5"]
    victim = start(*args)
    await wait_until(
        lambda: db.fetchval(
            "SELECT count(*) FROM chunkd.chunk_processing_queue WHERE status = 'processing'"
        ),
        timeout_s=15,
        what="chunks in flight on the victim",
    )
    survivor = start(*args)
    await survivor.wait_for_event("daemon.ready")
    held = await db.fetch(
        "SELECT id, attempts, worker_id FROM chunkd.chunk_processing_queue"
        " WHERE status = 'processing' AND worker_id LIKE $1",
        f"%:{victim.pid}:%",
    )
    assert held, "the victim should hold chunks when it is killed"
    victim.kill()
    await wait_until(lambda: _terminal(db, job), timeout_s=60, what="all 40 chunks")
    assert await status_counts(db, job) == {"completed": 40}
    reaped = await db.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE event = 'reaped' AND worker_id LIKE $1",
        f"%:{victim.pid}:%",
    )
    assert reaped >= 1
    # Each reap is one line, naming the dead worker that held the lease.
    lines = [e for e in survivor.events() if e["event"] == "chunk.reaped"]
    assert len(lines) == reaped, lines
    assert {e["worker_id"] for e in lines} == {held[0]["worker_id"]}
    assert {(e["attempt"], e["final"]) for e in lines} == {(1, False)}
    for row in held:  # the dead worker's late completion is fenced out
        assert await complete(db, row["id"], row["worker_id"], row["attempts"]) is False
    assert await status_counts(db, job) == {"completed": 40}


async def test_sigterm_releases_unfinished_chunks_and_a_restart_finishes(db, start) -> None:
    job = await create_job(db, [{"sleep_s": 3}] * 4 + [{"sleep_s": 0.01}] * 20)
    first = start("--handler", RECORD, "--concurrency", "4", "--shutdown-timeout", "1s")
    await wait_until(
        lambda: db.fetchval(
            "SELECT count(*) = 4 FROM chunkd.chunk_processing_queue WHERE status = 'processing'"
        ),
        timeout_s=15,
        what="4 chunks in flight",
    )
    stopped_at = time.monotonic()
    first.signal(signal.SIGTERM)
    assert await first.wait(10) == 0
    assert time.monotonic() - stopped_at < 4, "must exit within the shutdown timeout"
    rows = await db.fetch(
        "SELECT status, attempts FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        job,
    )
    assert Counter(r["status"] for r in rows)["processing"] == 0
    pending = [r for r in rows if r["status"] == "pending"]
    assert len(pending) >= 4 and all(r["attempts"] == 0 for r in pending)
    released = await db.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE event = 'released'"
    )
    assert released >= 4, "the four running chunks (and any prefetched) are released"
    start("--handler", RECORD, "--concurrency", "8")
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="the restarted daemon")
    assert await status_counts(db, job) == {"completed": 24}


async def test_postgres_restart_mid_run_daemon_survives_and_finishes(
    db, database, start, managed_cluster
) -> None:
    # The test handler's own pool also loses its connections: those executions fail and are
    # retried (quickly, and with attempts to spare), which is part of what this checks. A
    # claim that commits as the server goes down loses its reply: its chunks wait for their
    # lease (5 s here, well inside the wait below) and the reaper returns them.
    job = await create_job(db, [{"sleep_s": 0.05}] * 200, max_attempts=10)
    daemon = start(
        "--handler", RECORD, "--concurrency", "10", "--poll-interval", "60s", "--lease", "5s",
        *FAST,
    )  # fmt: skip
    await wait_until(
        lambda: db.fetchval(
            "SELECT count(*) > 20 FROM chunkd.chunk_processing_queue WHERE status = 'completed'"
        ),
        timeout_s=20,
        what="some progress",
    )
    await asyncio.to_thread(managed_cluster.restart)
    fresh = await connect(database.dsn)  # the old connection died with the server
    try:
        await wait_until(lambda: _terminal(fresh, job), timeout_s=60, what="all chunks")
        assert await status_counts(fresh, job) == {"completed": 200}
        runs = await fresh.fetchval("SELECT count(DISTINCT chunk_id) FROM public.test_executions")
        assert runs == 200
        completed_twice = await fresh.fetchval(
            "SELECT count(*) FROM (SELECT queue_id FROM chunkd.chunk_events"
            " WHERE event = 'completed' GROUP BY queue_id HAVING count(*) > 1) x"
        )
        assert completed_twice == 0
        assert daemon.process.poll() is None, "the daemon must survive the restart"
        events = [e["event"] for e in daemon.events()]
        assert events.count("listener.connected") >= 2, "it must re-LISTEN"
    finally:
        await fresh.close()


async def test_terminated_listener_still_picks_up_new_work_within_a_second(db, start) -> None:
    daemon = start("--handler", RECORD, "--poll-interval", "60s")
    await daemon.wait_for_event("daemon.ready")
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'chunkd-listener' AND datname = current_database()"
    )
    assert killed == 1
    job = await create_job(db, 3)
    enqueued_at = time.monotonic()
    await wait_until(lambda: _terminal(db, job), timeout_s=5, what="the new job", interval_s=0.01)
    assert time.monotonic() - enqueued_at < 1.0
    connects = [e for e in daemon.events() if e["event"] == "listener.connected"]
    assert len(connects) == 2, "the listener reconnected and re-LISTENed"


async def test_two_processes_on_2000_chunks_never_run_a_chunk_twice(db, start) -> None:
    job = await create_job(db, 2000)
    start("--handler", RECORD, "--concurrency", "20")
    start("--handler", RECORD, "--concurrency", "20")
    await wait_until(lambda: _terminal(db, job), timeout_s=90, what="2000 chunks")
    assert await status_counts(db, job) == {"completed": 2000}
    assert await db.fetchval("SELECT count(*) FROM public.test_executions") == 2000
    pids = await db.fetchval("SELECT count(DISTINCT pid) FROM public.test_executions")
    assert pids == 2, "both processes should have worked"


async def test_unknown_handler_and_bad_schema_are_clear_startup_errors(
    database, start, conn
) -> None:
    # At info: one line (at debug the import's traceback comes first: tests/test_app_cli.py).
    bad = start("--handler", "test=no_such_module:handle", log_level="info")
    assert await bad.wait(20) == 2
    assert "cannot import handler module 'no_such_module'" in bad.log_text()
    assert "Traceback" not in bad.log_text()
    await conn.execute(
        "INSERT INTO chunkd.schema_migrations (version, name) VALUES (999, 'future')"
    )
    ahead = start("--handler", RECORD)
    assert await ahead.wait(20) == 2
    assert "does not know" in ahead.log_text() and "Traceback" not in ahead.log_text()


async def test_result_the_database_refuses_fails_that_chunk_alone(db, start) -> None:
    job = await create_job(db, [{}] * 30 + [{"result": "nul"}] + [{}] * 30)
    start("--handler", RECORD, "--concurrency", "61")
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="all 61 chunks")
    assert await status_counts(db, job) == {"completed": 60, "failed": 1}
    row = await db.fetchrow(
        "SELECT attempts, error_message FROM chunkd.chunk_processing_queue WHERE status = 'failed'"
    )
    assert row["attempts"] == 1
    assert row["error_message"].startswith("result rejected by the database: ")


async def test_handlers_from_the_environment_one_per_line_keep_their_spaces(db, start) -> None:
    job = await create_job(db, 2)
    other = await create_job(db, 1, kind="other")
    handlers = (
        "test=exec:/bin/sh -c 'cat > /dev/null; echo {\\\"ok\\\": true}'\n\nother=" + RECORD[5:]
    )
    start(env={"CHUNKD_HANDLER": handlers})
    for j in (job, other):
        await wait_until(lambda j=j: _terminal(db, j), timeout_s=20, what=f"job {j}")
    results = await db.fetch(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
    )
    assert [r["result"] for r in results] == [{"ok": True}, {"ok": True}]
    assert await status_counts(db, other) == {"completed": 1}


@pytest.mark.parametrize(
    ("table", "step"),
    [("chunkd.schema_migrations", "schema check"), ("chunkd.workers", "register worker")],
)
async def test_a_connection_cut_during_start_up_is_waited_out(db, start, table, step) -> None:
    # Found by the chaos soak: a connection cut while a daemon registered itself (asyncpg
    # reported it as InternalClientError) ended the daemon with exit 1. The step is held on a
    # lock, its backend terminated while it waits, then the lock released.
    job = await create_job(db, 3)
    async with db.transaction():
        await db.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        daemon = start("--handler", RECORD)

        async def cut_a_waiting_step() -> bool:
            await db.execute("SELECT pg_stat_clear_snapshot()")  # read afresh in a transaction
            return bool(
                await db.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
                )
            )

        await wait_until(cut_a_waiting_step, timeout_s=20, what=f"the daemon waiting in {step}")
        event = await daemon.wait_for_event("database.not_ready", timeout_s=15)
        assert event["step"] == step
        assert daemon.process.poll() is None, "it waits instead of exiting"
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="the job")
    assert await status_counts(db, job) == {"completed": 3}
    assert daemon.process.poll() is None


async def test_daemon_started_during_a_restart_waits_for_the_server(
    db, database, start, managed_cluster
) -> None:
    job = await create_job(db, 5)
    # Smart shutdown: while our session lives, the server refuses new connections with
    # "the database system is shutting down", as it does in the middle of a restart.
    assert managed_cluster.pid is not None
    os.kill(managed_cluster.pid, signal.SIGTERM)
    daemon = start("--handler", RECORD)
    event = await daemon.wait_for_event("database.not_ready", timeout_s=15)
    assert "shutting down" in event["error"]
    assert daemon.process.poll() is None, "it waits instead of exiting"
    await asyncio.to_thread(managed_cluster.restart)
    fresh = await connect(database.dsn)
    try:
        await wait_until(lambda: _terminal(fresh, job), timeout_s=30, what="the job")
        assert await status_counts(fresh, job) == {"completed": 5}
    finally:
        await fresh.close()
