"""``chunkd doctor`` finds, on a real PostgreSQL, each thing that hurts a queue (issue #24,
part 3): a held REPEATABLE READ snapshot, a session idle in transaction holding a lock on a
chunkd table (and blocking another), a role missing a grant, a real PgBouncer in transaction
mode, a schema behind the code, dead rows autovacuum does not remove, dead workers and
daemons of another version, a host clock that is off. Each is really done, in another
connection or process; the doctor runs as the real ``chunkd doctor`` command.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from chunkd.db import connect, validate_identifier
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from chunkd.ops.doctor import Finding, Level
from chunkd.version import __version__
from daemon_helpers import CliRun, run_chunkd, wait_until
from delay_proxy import DelayProxy
from doc_snippets import blocks
from pgbouncer import pgbouncer
from resources import faketime_library, pgbouncer_binary
from sql_helpers import create_job
from test_security import ENQUEUE_FUNCTIONS, SECURITY_PAGE, WORKER_FUNCTIONS, dsn_as

Report = dict[str, Any]


async def doctor(dsn: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, Report]:
    """``chunkd doctor --json``: its exit code and report (and nothing on stderr)."""
    result: CliRun = await asyncio.to_thread(
        run_chunkd, "doctor", "--json", "--dsn", dsn, *args, env=env
    )
    assert result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.code
    return result.code, report


CHECK_NAMES = (
    "connection", "schema", "definitions", "privileges", "xmin-horizon",
    "idle-in-transaction", "dead-tuples", "listen-notify", "clock", "workers",
)  # fmt: skip


async def doctor_lines(dsn: str, *args: str) -> list[str]:
    """``chunkd doctor`` as text: exactly one line per check, each its level and its name
    (nothing on stderr); a server's multi-line error (its DETAIL or HINT) would break that."""
    result: CliRun = await asyncio.to_thread(run_chunkd, "doctor", "--dsn", dsn, *args)
    assert result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == list(CHECK_NAMES), result.stdout
    assert all(line.split()[0] in ("ok", "warning", "problem") for line in lines), lines
    return lines


def finding(report: Report, check: str) -> dict[str, Any]:
    (found,) = [f for f in report["findings"] if f["check"] == check]
    return found


async def _age_of(conn: asyncpg.Connection, pid: int) -> float:
    age: float = await conn.fetchval(
        "SELECT extract(epoch FROM now() - xact_start) FROM pg_stat_activity WHERE pid = $1", pid
    )
    return age


async def test_a_sound_database_with_a_live_daemon_is_all_ok(conn, database, start) -> None:
    daemon = start("--handler", "echo=bad_handlers:echo")
    await daemon.wait_for_event("daemon.ready")
    code, report = await doctor(database.dsn)
    assert code == 0, [f for f in report["findings"] if f["level"] != "ok"]
    assert [f["check"] for f in report["findings"]] == list(CHECK_NAMES)
    assert finding(report, "connection")["details"]["route"] == "direct"
    assert finding(report, "listen-notify")["details"]["round_trip_ms"] < 5000
    assert finding(report, "workers")["details"]["versions"] == [__version__]
    # The text form: one line per check, level first.
    lines = await doctor_lines(database.dsn)
    assert all(line.startswith("ok ") for line in lines), lines


async def test_a_held_repeatable_read_snapshot(conn, database) -> None:
    holder = await connect(database.dsn)
    try:
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM chunkd.jobs")  # takes the snapshot
        pid = holder.get_server_pid()
        await wait_until(
            lambda: _older(conn, pid, 1.2), timeout_s=10, what="a snapshot older than 1.2s"
        )
        code, report = await doctor(database.dsn, "--warn-age", "1s", "--problem-age", "1h")
        held = finding(report, "xmin-horizon")
        assert held["level"] == "warning" and code >= 1
        assert f"session pid {pid} of role postgres" in held["message"]
        assert "in its transaction for" in held["message"]
        assert f"pg_terminate_backend({pid})" in held["advice"]
        assert held["details"]["holders"][0]["pid"] == pid
        await wait_until(
            lambda: _older(conn, pid, 2.2), timeout_s=10, what="a snapshot older than 2.2s"
        )
        code, report = await doctor(database.dsn, "--warn-age", "1s", "--problem-age", "2s")
        assert code == 2 and finding(report, "xmin-horizon")["level"] == "problem"
    finally:
        await holder.close()
    code, report = await doctor(database.dsn, "--warn-age", "1s")
    assert finding(report, "xmin-horizon")["level"] == "ok"


async def _older(conn: asyncpg.Connection, pid: int, seconds: float) -> bool:
    return await _age_of(conn, pid) > seconds


async def test_an_idle_in_transaction_session_holding_a_chunkd_lock(conn, database) -> None:
    await create_job(conn, 1)
    job_id = await conn.fetchval("SELECT id FROM chunkd.jobs")
    idle = await connect(database.dsn)
    waiter = await connect(database.dsn)
    try:
        await idle.execute("BEGIN")
        await idle.execute("UPDATE chunkd.jobs SET priority = 1 WHERE id = $1", job_id)
        idle_pid, waiter_pid = idle.get_server_pid(), waiter.get_server_pid()
        blocked = asyncio.create_task(
            waiter.execute("UPDATE chunkd.jobs SET priority = 2 WHERE id = $1", job_id)
        )

        async def settled() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT bool_and(CASE pid WHEN $1 THEN state_change < now() - interval '1.2 s'"
                    "                         ELSE wait_event_type = 'Lock' END)"
                    " FROM pg_stat_activity WHERE pid IN ($1, $2)",
                    idle_pid,
                    waiter_pid,
                )
            )

        await wait_until(settled, timeout_s=10, what="an idle session and a blocked one")
        code, report = await doctor(database.dsn, "--warn-age", "1s")
        found = finding(report, "idle-in-transaction")
        assert code == 2 and found["level"] == "problem"
        assert f"pid {idle_pid} of role postgres" in found["message"]
        assert "chunkd.jobs (RowExclusiveLock)" in found["message"]
        assert f"blocking pid(s) {waiter_pid}" in found["message"]
        assert f"pg_terminate_backend({idle_pid})" in found["advice"]
        assert "idle_in_transaction_session_timeout" in found["advice"]
        await idle.execute("ROLLBACK")
        await blocked
    finally:
        await idle.close()
        await waiter.close()


@pytest.fixture
async def make_role(conn: asyncpg.Connection) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """LOGIN roles with USAGE on the schema and exactly the given functions."""
    made: list[str] = []

    async def _make(functions: list[str]) -> str:
        role = validate_identifier(f"chunkd_doc_{uuid.uuid4().hex[:10]}")
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        made.append(role)
        await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {role}")
        for signature in functions:
            await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.{signature} TO {role}")
        return role

    yield _make
    for role in made:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_a_role_missing_a_grant(conn, database, make_role) -> None:
    worker = await make_role(WORKER_FUNCTIONS)
    code, report = await doctor(dsn_as(database.dsn, worker))
    assert finding(report, "privileges")["level"] == "ok"
    assert finding(report, "privileges")["message"] == (
        f"role {worker} can: run; not granted: enqueue, client, flow, web, web actions, doctor"
    )
    # What this role may not read is reported as such, never as an error.
    workers = finding(report, "workers")
    assert workers["checked"] is False and workers["level"] == "warning"
    assert workers["message"] == f"not checked: role {worker} may not read chunkd.workers"
    idle = finding(report, "idle-in-transaction")  # this test's own session is another role's
    assert idle["level"] == "warning" and "hide their state and start" in idle["message"]
    assert idle["advice"] == f"GRANT pg_read_all_stats TO {worker}; shows them"

    # docs/security.md's enqueue-only role, with the client's optional three: two whole uses,
    # not a dashboard role missing grants (get_sync_job_progress is the dashboard's too).
    extras = ["get_sync_job_progress(uuid)", "cancel_sync_job(uuid)", "retry_failed_chunks(uuid)"]
    producer = await make_role(ENQUEUE_FUNCTIONS + extras)
    code, report = await doctor(dsn_as(database.dsn, producer))
    assert finding(report, "privileges")["message"].startswith(
        f"role {producer} can: enqueue, client; not granted: run,"
    )

    missing = next(s for s in WORKER_FUNCTIONS if s.startswith("reap_attempts"))
    lacking = await make_role([s for s in WORKER_FUNCTIONS if s != missing])
    code, report = await doctor(dsn_as(database.dsn, lacking))
    found = finding(report, "privileges")
    assert code == 2 and found["level"] == "problem"
    assert "'run' but lacks 1: chunkd.reap_attempts()" in found["message"]
    assert found["advice"] == f"GRANT EXECUTE ON FUNCTION chunkd.reap_attempts() TO {lacking};"
    # The advice is the fix: granted, the role is sound for chunkd run.
    await conn.execute(found["advice"])
    code, report = await doctor(dsn_as(database.dsn, lacking))
    assert finding(report, "privileges")["message"].startswith(f"role {lacking} can: run;")


@pytest.fixture(scope="module")
def bouncers(pg_server: Any) -> Iterator[dict[str, str]]:
    """Real PgBouncers in front of the test server, in transaction and in session mode."""
    binary = pgbouncer_binary()
    with (
        pgbouncer(binary, pg_server.admin_dsn) as transaction,
        pgbouncer(binary, pg_server.admin_dsn, pool_mode="session") as session,
    ):
        yield {"transaction": transaction, "session": session}


async def test_a_pgbouncer_transaction_pooler(database, bouncers: dict[str, str]) -> None:
    name = urlsplit(database.dsn).path.lstrip("/")
    pooled = bouncers["transaction"].format(db=name)
    code, report = await doctor(pooled)
    found = finding(report, "connection")
    assert found["level"] == "warning" and found["details"]["route"] == "transaction pooler"
    assert "through a transaction pooler" in found["message"]
    assert "chunkd migrate does not work" in found["message"]
    assert finding(report, "listen-notify")["checked"] is False
    assert finding(report, "schema")["level"] == "ok"  # the other checks still run through it
    # Told it is a session pooler, when it is not: a problem.
    code, report = await doctor(pooled, "--pooler", "session")
    assert code == 2 and finding(report, "connection")["level"] == "problem"
    # A real session pooler, named as such: fine, LISTEN included.
    code, report = await doctor(bouncers["session"].format(db=name), "--pooler", "session")
    found = finding(report, "connection")
    assert found["level"] == "ok" and "in session mode" in found["message"]
    assert finding(report, "listen-notify")["level"] == "ok"


async def test_told_session_through_a_transaction_pooler_every_time(
    database, bouncers: dict[str, str]
) -> None:
    """The same wrong --pooler again and again: each run leaves nothing on the server
    connections the pooler hands to the next (no named prepared statement), and each says
    the same problem in one line per check, as JSON and as text."""
    name = urlsplit(database.dsn).path.lstrip("/")
    pooled = bouncers["transaction"].format(db=name)
    for _ in range(2):
        code, report = await doctor(pooled, "--pooler", "session")
        found = finding(report, "connection")
        assert code == 2 and found["level"] == "problem", report
        assert "shares server connections between clients" in found["message"]
        lines = await doctor_lines(pooled, "--pooler", "session")
        assert lines[0].startswith("problem  connection "), lines


async def test_a_connection_cut_at_its_first_statement_is_one_finding(database) -> None:
    """Whatever ends the doctor's first statement (here the connection cut as it is sent),
    the doctor reports it as its one finding, never as an error without a report."""
    proxy = await DelayProxy(database.dsn, delay_s=0.0, cut_on=b"pg_read_all_stats").start()
    try:
        code, report = await doctor(proxy.dsn())
        text = await asyncio.to_thread(run_chunkd, "doctor", "--dsn", proxy.dsn())
    finally:
        await proxy.close()
    (found,) = report["findings"]
    assert code == 2 and found["check"] == "connection" and found["level"] == "problem"
    assert found["message"].startswith("connected, but the first statement failed"), found
    assert "the connection failed" in found["message"]
    assert text.code == 2 and text.stderr == "", text.stderr
    (line,) = text.stdout.splitlines()
    assert line.startswith("problem  connection           connected, but the first statement")


async def test_definitions_unreadable_by_the_role_say_the_grant(conn, database, make_role) -> None:
    """A role that may read the schema's version but not its recorded definitions: the
    definitions finding names the GRANT, like the schema check does, in one line."""
    role = await make_role(["schema_versions()"])
    _, report = await doctor(dsn_as(database.dsn, role))
    assert finding(report, "schema")["level"] == "ok"
    found = finding(report, "definitions")
    assert found["checked"] is False and found["level"] == "warning"
    assert found["message"] == (
        f"not checked: role {role} may not execute chunkd.schema_definitions: ask the schema's "
        f"owner for GRANT EXECUTE ON FUNCTION chunkd.schema_definitions(...) TO {role}; "
        "(docs/security.md lists the grants of each role)"
    )
    await doctor_lines(dsn_as(database.dsn, role))


def test_a_finding_is_one_line_whatever_a_check_puts_in_it() -> None:
    found = Finding("schema", Level.WARNING, "not checked: x\nHINT:  y\n", "do\n  this")
    assert found.message == "not checked: x HINT:  y" and found.advice == "do this"
    assert found.line() == "warning  schema               not checked: x HINT:  y; do this"


async def test_definitions_changed_by_hand_or_missing(conn, database) -> None:
    code, report = await doctor(database.dsn)
    assert finding(report, "definitions")["level"] == "ok", report
    # Someone "fixes" the queue depth in production with CREATE OR REPLACE.
    body = await conn.fetchval("SELECT pg_get_functiondef('chunkd.queue_depth()'::regprocedure)")
    await conn.execute(body.replace("SELECT", "SELECT DISTINCT", 1))
    code, report = await doctor(database.dsn)
    edited = finding(report, "definitions")
    assert edited["level"] == "warning" and code >= 1, edited
    assert edited["message"].startswith("the definitions of sql/functions/progress.sql were")
    assert edited["details"]["edited"] == ["functions/progress.sql"]
    assert "chunkd migrate --reapply puts the shipped ones back" in edited["advice"]
    # A plain migrate leaves a hand edit alone (its file did not change); --reapply does not.
    plain = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", database.dsn)
    assert plain.stdout.strip() == "chunkd schema already current: nothing changed", plain
    reapplied = await asyncio.to_thread(run_chunkd, "migrate", "--reapply", "--dsn", database.dsn)
    assert reapplied.stdout.strip() == "applied definition(s) functions/progress.sql", reapplied
    code, report = await doctor(database.dsn)
    assert finding(report, "definitions")["level"] == "ok", report
    assert "DISTINCT" not in await conn.fetchval(
        "SELECT pg_get_functiondef('chunkd.queue_depth()'::regprocedure)"
    )
    await conn.execute("DROP FUNCTION chunkd.next_schedule_at()")
    code, report = await doctor(database.dsn)
    gone = finding(report, "definitions")
    assert code == 2 and gone["level"] == "problem", gone
    assert gone["message"] == "objects of sql/functions/schedules.sql are missing from the database"


async def test_a_schema_behind_the_code(empty_database: str) -> None:
    code, report = await doctor(empty_database)
    assert code == 2 and "has no chunkd schema" in finding(report, "schema")["message"]
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=5)
    finally:
        await conn.close()
    code, report = await doctor(empty_database)
    found = finding(report, "schema")
    assert code == 2 and found["level"] == "problem"
    latest = migrations()[-1].version
    missing = list(range(6, latest + 1))
    assert f"version 5 applied, {latest} expected (missing {missing})" in found["message"]
    assert found["advice"].startswith("run chunkd migrate")
    # The definitions of a schema behind are not checked, and say why in their one line.
    behind = finding(report, "definitions")
    assert behind["checked"] is False and behind["level"] == "warning"
    assert behind["message"] == (
        f"not checked: the schema is behind this chunkd (version 5 applied, {latest} expected)"
    )
    assert behind["advice"].startswith("run chunkd migrate")
    lines = await doctor_lines(empty_database)
    assert lines[2].startswith("warning  definitions          not checked: the schema is behind")


async def test_dead_rows_autovacuum_does_not_remove(conn, database) -> None:
    await conn.execute("ALTER TABLE chunkd.concurrency_limits SET (autovacuum_enabled = false)")
    await conn.execute(
        "INSERT INTO chunkd.concurrency_limits (key, max_concurrency)"
        " SELECT 'k' || i, 1 FROM generate_series(1, 5000) i"
    )
    await conn.execute("DELETE FROM chunkd.concurrency_limits")

    async def counted() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT n_dead_tup >= 5000 FROM pg_stat_user_tables"
                " WHERE relid = 'chunkd.concurrency_limits'::regclass"
            )
        )

    await wait_until(counted, timeout_s=15, what="the statistics to count the dead rows")
    code, report = await doctor(database.dsn)
    found = finding(report, "dead-tuples")
    assert code == 1 and found["level"] == "warning"
    assert found["message"].startswith("chunkd.concurrency_limits has 5000 dead row(s) beside 0")
    assert "autovacuum is off for it" in found["message"]
    assert "RESET (autovacuum_enabled)" in found["advice"]


async def test_dead_workers_and_daemons_of_another_version(conn, database) -> None:
    register = "SELECT chunkd.register_worker($1, 'h', 1, $2, '{k}', 1)"
    await conn.execute(register, "h:1:aaaa", __version__)
    await conn.execute(register, "h:2:bbbb", __version__)
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '10 minutes'"
        " WHERE worker_id = 'h:2:bbbb'"
    )
    code, report = await doctor(database.dsn)
    found = finding(report, "workers")
    assert code == 1 and found["level"] == "warning"
    assert found["details"]["dead"] == ["h:2:bbbb"]
    # A row that does not say how often its daemon heartbeats (chunkd 0.2): 2 minutes.
    assert "silent for more than 2m00s (e.g. h:2:bbbb, which does not say" in found["message"]
    assert "WHERE worker_id = 'h:2:bbbb';" in found["advice"]
    await conn.execute(register, "h:3:cccc", "0.0.1")
    code, report = await doctor(database.dsn)
    found = finding(report, "workers")
    assert code == 1 and "1 of 2 live daemon(s) run chunkd 0.0.1" in found["message"]


async def test_a_killed_daemon_is_dead_after_three_of_its_own_heartbeats(
    conn, database, start
) -> None:
    """Without --stale-after the doctor judges each worker as the reaper does: dead once it
    missed three of the heartbeats its row says it sends (--lease 6s: one every 2 s)."""
    daemon = start("--handler", "echo=bad_handlers:echo", "--lease", "6s")
    await daemon.wait_for_event("daemon.ready")
    (worker_id,) = [r["worker_id"] for r in await conn.fetch("SELECT * FROM chunkd.workers")]

    async def heartbeat_s() -> float | None:
        value = await conn.fetchval("SELECT heartbeat_s FROM chunkd.workers")
        return None if value is None else float(value)

    await wait_until(heartbeat_s, timeout_s=10, what="the daemon's first heartbeat")
    assert await heartbeat_s() == 2.0
    _, report = await doctor(database.dsn)
    assert finding(report, "workers")["details"]["live"] == [worker_id]
    daemon.kill()  # SIGKILL: no deregistration, its row stays
    killed_at = asyncio.get_running_loop().time()

    async def dead() -> dict[str, Any] | None:
        _, report = await doctor(database.dsn)
        found = finding(report, "workers")
        return found if found["details"]["dead"] == [worker_id] else None

    found = await wait_until(dead, timeout_s=30, what="the doctor to find the daemon dead")
    # Three heartbeats (6 s) after its last one, plus a doctor run or two: not 2 minutes.
    assert asyncio.get_running_loop().time() - killed_at < 20
    assert found["level"] == "warning"
    assert "silent for more than three of their heartbeats" in found["message"]
    assert f"(e.g. {worker_id}, heartbeat every 2s, last heartbeat" in found["message"]
    # --stale-after, given, is the bound for every worker.
    _, report = await doctor(database.dsn, "--stale-after", "10m")
    assert finding(report, "workers")["details"]["live"] == [worker_id]


async def test_a_host_clock_ten_minutes_ahead(database) -> None:
    library = faketime_library()
    env = {"LD_PRELOAD": str(library), "FAKETIME": "+10m", "FAKETIME_NO_CACHE": "1"}
    code, report = await doctor(database.dsn, env=env)
    found = finding(report, "clock")
    assert code == 1 and found["level"] == "warning"
    assert 590 < -found["details"]["offset_s"] < 610, found
    assert "ahead of the database's" in found["message"]


async def test_it_writes_nothing_and_runs_on_a_read_only_database(conn, database) -> None:
    await conn.execute(f'ALTER DATABASE "{database.name}" SET default_transaction_read_only = on')
    code, report = await doctor(database.dsn)
    not_run = [f["check"] for f in report["findings"] if not f["checked"]]
    assert not_run == [], report
    assert finding(report, "listen-notify")["level"] == "ok"
    assert code == 1 and finding(report, "workers")["level"] == "warning"  # no daemon runs


async def test_the_documented_monitoring_role_sees_everything(conn, database) -> None:
    """docs/security.md's chunkd_doctor role, as written there: every check runs, and what
    it holds is one use of its own, not a role missing grants."""
    (block,) = [b for b in blocks(SECURITY_PAGE) if "CREATE ROLE chunkd_doctor" in b.text]
    role = validate_identifier(f"chunkd_doctor_{uuid.uuid4().hex[:8]}")
    await conn.execute(block.text.replace("chunkd_doctor", role).replace("'...'", "NULL"))
    try:
        holder = await connect(database.dsn)  # another role's session in a transaction
        try:
            await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await holder.fetchval("SELECT 1")
            code, report = await doctor(dsn_as(database.dsn, role))
        finally:
            await holder.close()
        assert [f["check"] for f in report["findings"] if not f["checked"]] == []
        assert code == 1 and finding(report, "workers")["message"].startswith("no chunkd run")
        assert finding(report, "privileges")["message"].startswith(f"role {role} can: doctor;")
        oldest = finding(report, "xmin-horizon")["details"]["holders"][0]
        assert oldest["visible"] is True and oldest["age_s"] is not None
        assert finding(report, "idle-in-transaction")["level"] == "ok"
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_an_unreachable_database_is_one_problem_without_the_password() -> None:
    code, report = await doctor("postgresql://someone:s3cret-pw@127.0.0.1:9/app")
    assert code == 2
    (found,) = report["findings"]
    assert found["check"] == "connection" and found["level"] == "problem"
    assert found["message"].startswith("cannot connect to postgresql://someone:***@127.0.0.1:9/app")
    assert "s3cret-pw" not in json.dumps(report)
    bad = await asyncio.to_thread(
        run_chunkd, "doctor", "--dsn", "postgresql://x@127.0.0.1:9/app", "--problem-age", "1s"
    )
    assert bad.code == 2
    assert bad.one_error_line() == "--problem-age must not be below --warn-age"
