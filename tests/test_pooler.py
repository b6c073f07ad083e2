"""chunkd through a transaction pooler: a real PgBouncer in ``pool_mode = transaction`` (issue
#16, item 8).

The input: ``chunkd enqueue`` failed with ``prepared statement "__asyncpg_stmt_1__" already
exists`` and ``chunkd run`` crashed. Now the pooler is detected (or named with ``--pooler
transaction`` / ``CHUNKD_POOLER``): no named prepared statements, no LISTEN (said once, then
polling every second), and ``migrate`` says in one line that it needs a session connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from chunkd.db import create_pool
from chunkd.db.listener import POOLER_POLL_INTERVAL_S
from chunkd.settings import Dsn
from daemon_helpers import CliRun, run_chunkd, wait_until
from pgbouncer import pgbouncer
from resources import pgbouncer_binary
from sql_helpers import status_counts


@pytest.fixture(scope="module")
def bouncer(pg_server) -> Iterator[str]:
    """A DSN template (``{db}``) that reaches the test server through PgBouncer."""
    with pgbouncer(pgbouncer_binary(), pg_server.admin_dsn) as template:
        yield template


@pytest.fixture(scope="module")
def session_bouncer(pg_server) -> Iterator[str]:
    """The same in ``pool_mode = session`` (Supabase's session pooler is of this kind)."""
    with pgbouncer(pgbouncer_binary(), pg_server.admin_dsn, pool_mode="session") as template:
        yield template


@pytest.fixture
def pooled_dsn(bouncer: str, database) -> str:
    return bouncer.format(db=urlsplit(database.dsn).path.lstrip("/"))


async def chunkd(*args: str, dsn: str, stdin: bytes = b"", **env: str) -> CliRun:
    return await asyncio.to_thread(run_chunkd, *args, "--dsn", dsn, stdin=stdin, env=env)


async def finished(conn, job: str, counts: dict[str, int]) -> bool:
    return await status_counts(conn, job) == counts


async def test_cli_and_daemon_work_through_pgbouncer_in_transaction_mode(
    conn, pooled_dsn: str, start
) -> None:
    # migrate: one line, nothing done.
    migrate = await chunkd("migrate", dsn=pooled_dsn)
    assert migrate.code == 2
    assert migrate.one_error_line().startswith("chunkd migrate needs a session connection")
    check = await chunkd("migrate", "--check", dsn=pooled_dsn)
    assert check.code == 0, check.stderr
    # enqueue, many times: each run used to leave a named statement on a server connection.
    jobs = []
    for _ in range(5):
        result = await chunkd(
            "enqueue", "--kind", "echo", "-", dsn=pooled_dsn, stdin=b'[{"a": 1}, {"a": 2}]'
        )
        assert result.code == 0, result.stderr
        jobs.append(result.stdout.strip())
    failing = await chunkd(
        "enqueue", "--kind", "boom", "--max-attempts", "2", "-", dsn=pooled_dsn, stdin=b"[1]"
    )
    assert failing.code == 0, failing.stderr
    daemon = start(
        "--handler", "echo=bad_handlers:echo", "--handler", "boom=bad_handlers:raises",
        "--retry-base", "50ms", "--retry-cap", "100ms", "--concurrency", "4",
        "--poll-interval", "60s",
        dsn=pooled_dsn,
    )  # fmt: skip
    for job in jobs:
        await wait_until(
            lambda job=job: finished(conn, job, {"completed": 2}), timeout_s=30, what=job
        )
    await wait_until(
        lambda: finished(conn, failing.stdout.strip(), {"failed": 1}), timeout_s=30, what="retries"
    )
    # Idle now; new work is found by the one-second poll (the safety poll is a minute away).
    late = await chunkd("enqueue", "--kind", "echo", "-", dsn=pooled_dsn, stdin=b"[1, 2, 3]")
    job = late.stdout.strip()
    await wait_until(
        lambda: finished(conn, job, {"completed": 3}),
        timeout_s=POOLER_POLL_INTERVAL_S + 10,
        what="a job enqueued while the daemon was idle",
    )
    for command in (["status"], ["status", job], ["workers"]):
        result = await chunkd(*command, dsn=pooled_dsn)
        assert result.code == 0, (command, result.stderr)
    cancel = await chunkd("cancel", job, dsn=pooled_dsn)
    assert cancel.code == 2 and "already finished (completed)" in cancel.one_error_line()
    assert await daemon.stop() == 0
    events = daemon.events()
    unavailable = [e for e in events if e["event"] == "listener.unavailable"]
    assert len(unavailable) == 1, unavailable
    assert "transaction pooler was detected" in unavailable[0]["reason"]
    assert not [e for e in events if e["event"] in ("listener.connected", "task.crashed")]
    problems = [e for e in events if e["level"] == "error" and e["event"] != "chunk.failed"]
    assert problems == []
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0, "deregistered"


async def test_pooler_named_by_option_or_environment(conn, database, pooled_dsn: str, start):
    """CHUNKD_POOLER=transaction through PgBouncer, and --pooler transaction on a direct
    connection (which needs no LISTEN connection either)."""
    for dsn, env, flags in (
        (pooled_dsn, {"CHUNKD_POOLER": "transaction"}, ()),
        (database.dsn, {}, ("--pooler", "transaction")),
    ):
        enqueued = await chunkd(
            "enqueue", *flags, "--kind", "echo", "-", dsn=dsn, stdin=b"[1]", **env
        )
        assert enqueued.code == 0, enqueued.stderr
        job = enqueued.stdout.strip()
        daemon = start("--handler", "echo=bad_handlers:echo", *flags, dsn=dsn, env=env)
        await wait_until(
            lambda job=job: finished(conn, job, {"completed": 1}), timeout_s=30, what="the job"
        )
        listeners = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chunkd-listener'"
        )
        assert listeners == 0
        assert await daemon.stop() == 0
        (unavailable,) = [e for e in daemon.events() if e["event"] == "listener.unavailable"]
        assert unavailable["reason"].startswith("--pooler transaction")


async def test_session_pooler_named_with_pooler_session_keeps_listen_and_the_pin(
    conn, database, empty_database: str, session_bouncer: str, start
) -> None:
    """PgBouncer refuses search_path as a startup parameter, so it is SET after connecting,
    and stays: the pool's release resets nothing (asyncpg's RESET ALL would undo it)."""
    empty = session_bouncer.format(db=urlsplit(empty_database).path.lstrip("/"))
    migrate = await chunkd("migrate", "--pooler", "session", dsn=empty)
    assert migrate.code == 0, migrate.stderr
    dsn = session_bouncer.format(db=database.name)
    pool = await create_pool(Dsn(dsn, "session"), size=2)
    try:
        for _ in range(3):  # each fetch releases the connection, and the pool resets it
            assert await pool.fetchval("SHOW search_path") == "pg_catalog, pg_temp"
    finally:
        await pool.close()
    daemon = start("--handler", "echo=bad_handlers:echo", "--poll-interval", "60s", dsn=dsn,
                   env={"CHUNKD_POOLER": "session"})  # fmt: skip
    await daemon.wait_for_event("daemon.ready")
    job = (await chunkd("enqueue", "--kind", "echo", "-", dsn=dsn, stdin=b"[1, 2]")).stdout
    # Woken by NOTIFY through the session pooler: the safety poll is a minute away.
    await wait_until(
        lambda: finished(conn, job.strip(), {"completed": 2}), timeout_s=10, what="the job"
    )
    assert await daemon.stop() == 0
    events = [e["event"] for e in daemon.events()]
    assert "listener.connected" in events and "listener.unavailable" not in events


async def test_a_pool_release_sends_nothing_and_still_rolls_back_an_open_transaction(
    conn, pool
) -> None:
    """chunkd's pools keep no session state, so a release sends no reset statement (asyncpg's
    default sends four, in a round trip before the caller gets its rows); a transaction left
    open is still rolled back."""
    async with pool.acquire() as held:
        pid = await held.fetchval("SELECT pg_backend_pid()")
    last = await conn.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
    assert last == "SELECT pg_backend_pid()", "nothing was sent on release"
    async with pool.acquire() as held:
        await held.execute("BEGIN; CREATE TEMPORARY TABLE left_open (x int)")
        pid = await held.fetchval("SELECT pg_backend_pid()")
    async with pool.acquire() as held:
        assert await held.fetchval("SELECT pg_backend_pid()") == pid, "the same connection"
        assert not held.is_in_transaction()
        assert await held.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
