"""Every bad input we could think of: one clear error line, a defined exit code, and nothing
written or lost. The CLI runs as a real subprocess; daemons are real ``chunkd run`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from chunkd.db import DatabaseError, connect
from chunkd.db.sql_files import migrations
from chunkd.demo.cluster import PostgresCluster
from daemon_handlers import EXECUTIONS_DDL
from daemon_helpers import TESTS_DIR, wait_until
from resources import faketime_library
from sql_helpers import create_job, status_counts

EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # the database cannot be reached now: a service manager tries again


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def one_error_line(self) -> str:
        """The single ``chunkd: error: ...`` line on stderr (and no traceback)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("chunkd: error: "), self.stderr
        return lines[0]


def chunkd(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Result:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
    )
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "chunkd.cli", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=60,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode(errors="replace"))


def with_dbname(dsn: str, dbname: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{dbname}"))


async def jobs_in(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs")


async def _terminal(conn: asyncpg.Connection, job) -> bool:
    counts = await status_counts(conn, job)
    return not counts.get("pending") and not counts.get("processing")


# --------------------------------------------------------------------------------------------
# chunkd enqueue
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'[{"a": 1},\n {"b": 2},\n {"c": oops}\n]', "line 3: invalid JSON"),
        (b'{"a": 1}\n{"b": 2}\n\n{"c": \n{"d": 4}\n', "line 4: invalid JSON"),
        (b"[1, 2,\n 3", "line 2: invalid JSON"),
        (b"[NaN]", "invalid JSON: NaN is not valid JSON"),
        (b'[{"a": "\\u0000"}]', "chunk 0 (0-based) contains \\u0000"),
        (b"\xff\xfe not utf-8", "line 1: input is not UTF-8"),
    ],
    ids=["array-line-3", "ndjson-line-4", "truncated", "nan", "nul", "not-utf8"],
)
async def test_malformed_enqueue_input_names_the_line(
    conn, database, tmp_path, text: bytes, expected: str
) -> None:
    path = tmp_path / "chunks.json"
    path.write_bytes(text)
    result = chunkd("enqueue", "--dsn", database.dsn, "--kind", "k", str(path))
    assert result.code == EXIT_USAGE
    assert expected in result.one_error_line()
    assert result.stdout == ""
    assert await jobs_in(conn) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{\n  "chunks": [1, 2]\n}', "not a JSON array of chunk payloads"),
        (b"[]", "the input array is empty"),
        (b"  \n\n", "the input is empty"),
    ],
    ids=["object", "empty-array", "blank"],
)
async def test_enqueue_rejects_non_array_and_empty_input(
    conn, database, text: bytes, expected: str
) -> None:
    result = chunkd("enqueue", "--dsn", database.dsn, "--kind", "k", "-", stdin=text)
    assert result.code == EXIT_USAGE
    assert expected in result.one_error_line()
    assert await jobs_in(conn) == 0


async def test_enqueue_of_ndjson_and_an_array_both_work(conn, database) -> None:
    """The control case: valid input of either form makes exactly one job."""
    for text, n in ((b'{"a": 1}\n{"a": 2}\n', 2), (b'[{"a": 1}, {"a": 2}, 3]', 3)):
        result = chunkd("enqueue", "--dsn", database.dsn, "--kind", "k", "-", stdin=text)
        assert result.code == 0, result.stderr
        job = result.stdout.strip()
        assert await status_counts(conn, job) == {"pending": n}
    assert await jobs_in(conn) == 2


async def test_sql_rejects_non_array_and_empty_chunks(conn) -> None:
    for chunks, expected in (
        ('{"a": 1}', "chunks must be a JSON array of chunk payloads, got object"),
        ('"text"', "chunks must be a JSON array of chunk payloads, got string"),
        ("null", "chunks must be a JSON array of chunk payloads, got null"),
        ("[]", "chunks must not be empty"),
    ):
        with pytest.raises(DatabaseError, match=expected):
            await conn.fetchval("SELECT chunkd.create_sync_job('k', $1::jsonb)", chunks)
    assert await jobs_in(conn) == 0


async def test_fifty_megabyte_input_is_rejected_at_the_documented_limit(
    conn, database, tmp_path
) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(["x" * (50 * 1024 * 1024)]))
    result = chunkd("enqueue", "--dsn", database.dsn, "--kind", "k", str(path))
    assert result.code == EXIT_USAGE
    assert "above the limit of 16 MiB per job" in result.one_error_line()
    # A job payload above 1 MiB cannot even pass through argv (--payload); the SQL limit holds
    # for every client.
    with pytest.raises(DatabaseError, match=r"job payload is .* above the limit of 1 MiB"):
        await conn.fetchval(
            "SELECT chunkd.create_sync_job('k', '[1]', $1::jsonb)",
            json.dumps({"blob": "y" * (2 * 1024 * 1024)}),
        )
    assert await jobs_in(conn) == 0


# --------------------------------------------------------------------------------------------
# Kinds and handler specs
# --------------------------------------------------------------------------------------------


async def test_unknown_kind_waits_is_reported_and_harms_no_daemon(conn, database, start) -> None:
    orphan = await create_job(conn, 3, kind="nobody-handles-this")
    daemon = start("--handler", "echo=bad_handlers:echo", "--poll-interval", "200ms")
    await daemon.wait_for_event("daemon.ready")
    # The daemon keeps working on the kinds it has, before and after the orphan arrived.
    for _ in range(2):
        job = await create_job(conn, 5, kind="echo")
        await wait_until(lambda job=job: _terminal(conn, job), timeout_s=20, what="echo job")
        assert await status_counts(conn, job) == {"completed": 5}
    await asyncio.sleep(0.5)  # several safety polls (200 ms) have come and gone
    assert await status_counts(conn, orphan) == {"pending": 3}
    assert await conn.fetchval(
        "SELECT max(attempts) FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        orphan,
    ) == 0  # fmt: skip
    result = chunkd("status", "--dsn", database.dsn, str(orphan))
    assert result.code == 0, result.stderr
    assert "no live worker handles kind 'nobody-handles-this'" in result.stdout
    assert daemon.process.poll() is None
    assert await daemon.stop() == 0
    assert not [e for e in daemon.events() if e.get("level") == "error"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("x=no_such_module_zz:handle", "cannot import handler module 'no_such_module_zz'"),
        ("x=bad_handlers:no_such_function", "has no attribute 'no_such_function'"),
        ("x=bad_handlers", "is not module:function"),
        ("x=os:sep", "is not callable"),
        ("x=bad_handlers:pages", "is a generator: a handler returns its result"),
        ("=bad_handlers:echo", "is not KIND=SPEC"),
        ("x=exec:", "exec handler needs a command"),
    ],
)
def test_handler_spec_that_does_not_resolve_is_exit_2(database, spec: str, expected: str) -> None:
    result = chunkd("run", "--dsn", database.dsn, "--handler", spec)
    assert result.code == EXIT_USAGE
    assert expected in result.one_error_line()


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--maintenance-interval", "1ms", "--maintenance-interval must be at least 100ms, or 0"),
        ("--lease", "9" * 30 + "s", "is too long (at most 999999999 days)"),
    ],
)
def test_run_option_out_of_range_is_exit_2(
    database, option: str, value: str, expected: str
) -> None:
    result = chunkd("run", "--dsn", database.dsn, "--handler", "x=bad_handlers:echo", option, value)
    assert result.code == EXIT_USAGE
    assert expected in result.one_error_line()


# --------------------------------------------------------------------------------------------
# DSNs and schemas
# --------------------------------------------------------------------------------------------

PW_ROLE = "chunkd_pw_user"
PW_SECRET = "right-Passw0rd"


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[PostgresCluster]:
    """A cluster of our own that asks for passwords (the shared one trusts the socket)."""
    cluster = PostgresCluster(fsync=False)
    cluster.init()
    assert cluster.base_dir is not None
    hba = cluster.base_dir / "pg_hba_password.conf"
    hba.write_text("local all postgres trust\nlocal all all scram-sha-256\n")
    hba.chmod(0o644)
    cluster.extra_settings = {"hba_file": str(hba), "password_encryption": "scram-sha-256"}
    try:
        cluster.start()

        async def make_role() -> None:
            conn = await connect(cluster.dsn("postgres"))
            try:
                await conn.execute(f"CREATE ROLE {PW_ROLE} LOGIN PASSWORD '{PW_SECRET}'")
            finally:
                await conn.close()

        asyncio.run(make_role())
        yield cluster
    finally:
        cluster.cleanup()


def _pw_dsn(cluster: PostgresCluster, password: str) -> str:
    parts = urlsplit(cluster.dsn("postgres"))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{PW_ROLE}:{quote(password)}@{host}"))


@pytest.mark.parametrize("command", [["run", "--handler", "x=bad_handlers:echo"], ["migrate"]])
def test_wrong_password_is_one_line_without_the_password(password_cluster, command) -> None:
    result = chunkd(*command, "--dsn", _pw_dsn(password_cluster, "wrong-Secret-77"))
    assert result.code == EXIT_USAGE
    line = result.one_error_line()
    assert "password authentication failed" in line
    assert "wrong-Secret-77" not in result.stderr + result.stdout
    # The control: the right password gets past authentication (to the missing schema).
    ok = chunkd("migrate", "--check", "--dsn", _pw_dsn(password_cluster, PW_SECRET))
    assert ok.code == 1 and "no chunkd schema" in ok.one_error_line()
    assert PW_SECRET not in ok.stderr


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://postgres@127.0.0.1:9/db", "postgresql://postgres@/db?host=/nonexistent/dir"],
    ids=["refused-port", "missing-socket"],
)
@pytest.mark.parametrize(
    "command",
    [["run", "--handler", "x=bad_handlers:echo"], ["migrate"], ["status"], ["enqueue", "-k", "x"]],
    ids=["run", "migrate", "status", "enqueue"],
)
def test_unreachable_database_is_one_line(dsn: str, command: list[str]) -> None:
    args = [c for c in command if c != "-k"]
    if command[0] == "enqueue":
        args = ["enqueue", "--kind", "x", "-"]
    result = chunkd(*args, "--dsn", dsn, stdin=b"[1]")
    assert result.code == EXIT_TEMPFAIL
    assert "cannot connect to" in result.one_error_line()


async def test_a_connection_cut_mid_command_is_one_line_and_exit_75(conn, database) -> None:
    """A cut no command translates (here `chunkd migrate`, waiting for the migration lock
    another session holds): one line, and EX_TEMPFAIL, never exit 2, which the units do not
    restart."""
    await conn.execute("SELECT pg_advisory_lock(hashtext('chunkd.migrate'))")
    try:
        migrating = asyncio.create_task(asyncio.to_thread(chunkd, "migrate", "--dsn", database.dsn))
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        pid = await wait_until(
            lambda: conn.fetchval(waiting), timeout_s=20, what="migrate to wait for the lock"
        )
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        result = await asyncio.wait_for(migrating, timeout=30)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('chunkd.migrate'))")
    assert result.code == EXIT_TEMPFAIL, result.stderr
    line = result.one_error_line()
    assert line.startswith("chunkd: error: the connection to the database failed: "), line


async def test_database_without_the_schema(pg_server, database) -> None:
    admin = await connect(pg_server.admin_dsn)
    name = f"{database.name}_empty"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_dbname(database.dsn, name)
        run = chunkd("run", "--dsn", dsn, "--handler", "x=bad_handlers:echo")
        assert run.code == EXIT_USAGE
        assert "no chunkd schema: run `chunkd migrate`" in run.one_error_line()
        enqueue = chunkd("enqueue", "--dsn", dsn, "--kind", "x", "-", stdin=b"[1]")
        assert enqueue.code == EXIT_USAGE
        assert "chunkd migrate" in enqueue.one_error_line()
        check = chunkd("migrate", "--check", "--dsn", dsn)
        assert check.code == 1 and "no chunkd schema" in check.one_error_line()
        empty = await connect(dsn)
        try:  # nothing was created by any of them
            assert await empty.fetchval("SELECT to_regnamespace('chunkd')") is None
        finally:
            await empty.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_schema_from_a_newer_version(conn, database) -> None:
    await conn.execute("INSERT INTO chunkd.schema_migrations (version, name) VALUES (99, 'x')")
    run = chunkd("run", "--dsn", database.dsn, "--handler", "x=bad_handlers:echo")
    assert run.code == EXIT_USAGE
    assert "version(s) [99] that this chunkd does not know" in run.one_error_line()
    migrate = chunkd("migrate", "--dsn", database.dsn)
    assert migrate.code == EXIT_USAGE and "upgrade chunkd" in migrate.one_error_line()
    check = chunkd("migrate", "--check", "--dsn", database.dsn)
    assert check.code == 1 and "does not know" in check.one_error_line()
    known = len(migrations())
    assert await conn.fetchval("SELECT count(*) FROM chunkd.schema_migrations") == known + 1
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0


# --------------------------------------------------------------------------------------------
# Handlers that misbehave
# --------------------------------------------------------------------------------------------


async def test_handlers_that_raise_hang_return_junk_or_exit_fail_only_their_chunk(
    conn, start
) -> None:
    jobs = {
        kind: await create_job(conn, 2, kind=kind, max_attempts=2)
        for kind in (
            "raises", "hangs", "hides_timeout", "ignores_timeout", "non_json", "sys_exit", "echo"
        )
    }  # fmt: skip
    daemon = start(
        *[a for kind in jobs for a in ("--handler", f"{kind}=bad_handlers:{kind}")],
        "--chunk-timeout", "500ms", "--retry-base", "50ms", "--retry-cap", "100ms",
        "--concurrency", "4",
    )  # fmt: skip
    for kind, job in jobs.items():
        await wait_until(lambda job=job: _terminal(conn, job), timeout_s=30, what=kind)
    expected = {
        "raises": ("failed", 2, "ValueError: bad chunk"),
        "hangs": ("failed", 2, "timed out after 0.5s"),
        "hides_timeout": ("failed", 2, "timed out after 0.5s"),
        "ignores_timeout": ("completed", 1, None),
        "non_json": ("failed", 1, "handler returned a value that is not JSON"),
        "sys_exit": ("failed", 2, "SystemExit: 3"),
        "echo": ("completed", 1, None),
    }
    for kind, (status, attempts, error) in expected.items():
        rows = await conn.fetch(
            "SELECT status, attempts, error_message FROM chunkd.chunk_processing_queue"
            " WHERE parent_sync_job_id = $1",
            jobs[kind],
        )
        for row in rows:
            assert (row["status"], row["attempts"]) == (status, attempts), (kind, dict(row))
            if error:
                assert error in row["error_message"], (kind, row["error_message"])
    assert daemon.process.poll() is None, "the daemon survived all of them"
    events = daemon.events()
    assert not [e for e in events if e["event"] in ("task.crashed", "chunk.report_failed")]
    # Still healthy: new work runs at once.
    job = await create_job(conn, 3, kind="echo")
    await wait_until(lambda: _terminal(conn, job), timeout_s=15, what="work after the bad ones")
    assert await daemon.stop() == 0


async def test_sigstopped_daemon_loses_its_chunks_and_gives_them_up_on_resume(conn, start) -> None:
    job = await create_job(conn, [{"sleep_s": 2.5}] * 4, kind="slow")
    args = ["--handler", "slow=bad_handlers:slow_echo", "--lease", "1500ms",
            "--reap-interval", "200ms", "--concurrency", "4"]  # fmt: skip
    frozen = start(*args)

    async def all_held() -> bool:
        return await conn.fetchval(
            "SELECT count(*) = 4 FROM chunkd.chunk_processing_queue"
            " WHERE status = 'processing' AND worker_id LIKE $1",
            f"%:{frozen.pid}:%",
        )

    await wait_until(all_held, timeout_s=15, what="the first daemon to hold all 4 chunks")
    held = await conn.fetch(
        "SELECT id, worker_id, attempts FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    frozen.signal(signal.SIGSTOP)
    rescuer = start(*args)
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="the rescuer")
    frozen.signal(signal.SIGCONT)

    async def given_up() -> list[dict]:
        found = [e for e in frozen.events() if e["event"] == "chunk.lease_lost"]
        return found if len(found) == 4 else []

    # On resuming, its leases are long over by its own clock: the handlers are cancelled
    # before they can finish, so nothing of theirs is even sent.
    lost = await wait_until(given_up, timeout_s=15, what="4 handlers given up")
    assert {e["queue_id"] for e in lost} == {str(r["id"]) for r in held}
    assert {e["action"] for e in lost} == {"handler cancelled"}
    stalls = [e for e in frozen.events() if e["event"] == "event_loop.stalled"]
    assert len(stalls) == 1
    frozen_worker = held[0]["worker_id"]
    events = await conn.fetch(
        "SELECT queue_id, event, worker_id FROM chunkd.chunk_events WHERE sync_job_id = $1"
        " AND event IN ('completed', 'reaped')",
        job,
    )
    completed = [e for e in events if e["event"] == "completed"]
    assert len(completed) == 4 and len({e["queue_id"] for e in completed}) == 4
    assert not [e for e in completed if e["worker_id"] == frozen_worker]
    assert len([e for e in events if e["event"] == "reaped"]) == 4
    results = await conn.fetch(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
    )
    assert {r["result"]["pid"] for r in results} == {rescuer.pid}
    assert await status_counts(conn, job) == {"completed": 4}
    assert await frozen.stop() == 0
    assert not [e for e in frozen.events() if e["event"] in ("chunk.completed", "chunk.fenced")]


@pytest.mark.parametrize("offset", ["+2h", "-3h"])
async def test_clock_skewed_daemon_follows_the_database_clock(conn, start, offset: str) -> None:
    """A daemon whose clock is hours off (libfaketime) behaves exactly as an honest one:
    leases, retry delays and timers all come from the database clock."""
    library = faketime_library()  # under CI a missing libfaketime fails this test
    await conn.execute(EXECUTIONS_DDL)
    job = await create_job(conn, [{"fail_until": 1, "sleep_s": 1.0}] * 3, max_attempts=3)
    daemon = start(
        "--handler", "test=daemon_handlers:record", "--lease", "1500ms",
        "--reap-interval", "200ms", "--retry-base", "1s", "--retry-cap", "1s",
        "--poll-interval", "60s",
        env={"LD_PRELOAD": str(library), "FAKETIME": offset, "FAKETIME_NO_CACHE": "1"},
    )  # fmt: skip
    ready = await daemon.wait_for_event("daemon.ready")
    db_now = await conn.fetchval("SELECT now()")
    skew_h = (datetime.fromisoformat(ready["timestamp"]) - db_now).total_seconds() / 3600
    assert abs(skew_h - float(offset.rstrip("h"))) < 0.1, f"the daemon's clock is {skew_h:+.2f}h"
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="the skewed daemon")
    assert await status_counts(conn, job) == {"completed": 3}
    # Leases of 1.5 s held over 1 s handlers: a skewed lease would have expired or never do.
    assert (
        await conn.fetchval("SELECT count(*) FROM chunkd.chunk_events WHERE event = 'reaped'") == 0
    )
    runs = await conn.fetch(
        "SELECT chunk_id, attempt, started_at, ended_at FROM public.test_executions"
        " ORDER BY started_at"
    )
    assert len(runs) == 6
    by_chunk: dict = {}
    for r in runs:
        by_chunk.setdefault(r["chunk_id"], []).append(r)
    for first, second in by_chunk.values():
        gap = (second["started_at"] - first["ended_at"]).total_seconds()
        # The retry (base 1 s, jitter to [0.5, 1] s) is due by the database clock, and the
        # daemon's timer, armed from the NOTIFY's relative delay, starts it on time.
        assert 0.45 <= gap <= 2.5, gap
    assert await daemon.stop() == 0
