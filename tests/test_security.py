"""Security: hostile input stays data, the schema grants nothing to PUBLIC, the documented
least-privilege roles are exactly enough, and secrets never reach logs or error messages.

Roles are cluster-wide, so each test makes its own with a random name and drops it after.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from chunkd.db import DatabaseError, connect, validate_identifier
from chunkd.redact import redact_dsn, scrub_password
from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts

ROOT = Path(__file__).resolve().parent.parent
SECURITY_PAGE = ROOT / "docs" / "security.md"


def _documented_grants(role: str) -> list[str]:
    """The functions docs/security.md grants to ``role``: the tests use exactly what users copy."""
    page = SECURITY_PAGE.read_text(encoding="utf-8")
    grant = rf"GRANT EXECUTE ON FUNCTION\s+((?:(?!GRANT).)*?)\s+TO {role};"
    match = re.search(grant, page, re.DOTALL)
    assert match, f"docs/security.md documents no EXECUTE grant to {role}"
    signatures = re.findall(r"chunkd\.(\w+\([^)]*\))", match[1])
    assert signatures, f"no functions in docs/security.md's grant to {role}"
    return signatures


WORKER_FUNCTIONS = _documented_grants("chunkd_worker")
ENQUEUE_FUNCTIONS = _documented_grants("chunkd_enqueue")

HOSTILE_STRINGS = [
    "o'brien",
    'say "hi"',
    "$$; DROP TABLE chunkd.sync_jobs; $$",
    "'); DELETE FROM chunkd.chunk_processing_queue; --",
    "back\\slash\\",
    "$tag$ $1 $2 %s %(x)s {}",
    "x" * 10_000,
]


def dsn_as(dsn: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user) + (f":{quote(password)}" if password else "")
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


@pytest.fixture
async def make_role(conn: asyncpg.Connection) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Creates LOGIN roles with exactly the given functions granted (plus USAGE if any)."""
    made: list[str] = []

    async def _make(functions: list[str] | None = None, *, usage: bool = True) -> str:
        role = f"chunkd_sec_{uuid.uuid4().hex[:10]}"
        validate_identifier(role)  # identifiers cannot be bound parameters: validated instead
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        made.append(role)
        if usage:
            await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {role}")
        for signature in functions or []:
            await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.{signature} TO {role}")
        return role

    yield _make
    for role in made:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def _terminal(conn: asyncpg.Connection, job: uuid.UUID) -> bool:
    counts = await status_counts(conn, job)
    return not counts.get("pending") and not counts.get("processing")


# --------------------------------------------------------------------------------------------
# Hostile input is data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE_STRINGS, ids=lambda t: t[:20])
async def test_hostile_strings_are_stored_verbatim_as_payloads(conn, text: str) -> None:
    job = await create_job(conn, [{"s": text}, text], payload={"k": text})
    rows = await conn.fetch(
        "SELECT c.payload, j.payload AS job_payload FROM chunkd.chunked_sync_jobs c"
        " JOIN chunkd.sync_jobs j ON j.id = c.sync_job_id WHERE j.id = $1 ORDER BY c.seq",
        job,
    )
    assert [r["payload"] for r in rows] == [{"s": text}, text]
    assert rows[0]["job_payload"] == {"k": text}
    assert await conn.fetchval("SELECT count(*) FROM chunkd.chunk_processing_queue") == 2


@pytest.mark.parametrize("kind", HOSTILE_STRINGS[:-1], ids=lambda t: t[:20])
async def test_hostile_kinds_are_stored_verbatim(conn, kind: str) -> None:
    job = await create_job(conn, 1, kind=kind)
    assert await conn.fetchval("SELECT kind FROM chunkd.sync_jobs WHERE id = $1", job) == kind


async def test_oversized_kind_is_a_clear_error_and_writes_nothing(conn) -> None:
    with pytest.raises(DatabaseError, match="kind must be a non-empty text of at most 200"):
        await create_job(conn, 1, kind="k" * 10_000)
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


@pytest.mark.parametrize(
    "chunks",
    ['[{"s": "nul \\u0000 here"}]', '["\\u0000"]'],
    ids=["in-object", "bare-string"],
)
async def test_nul_bytes_in_payloads_are_rejected_clearly(conn, chunks: str) -> None:
    with pytest.raises(DatabaseError, match=r"\\u0000 cannot be converted to text"):
        await conn.fetchval("SELECT chunkd.create_sync_job('k', $1::jsonb)", chunks)
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


async def test_nul_byte_in_kind_is_rejected_clearly(conn) -> None:
    # Postgres text cannot hold NUL; the server refuses the bound value itself.
    with pytest.raises(DatabaseError, match="0x00"):
        await create_job(conn, 1, kind="bad\0kind")
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


async def test_daemon_runs_hostile_kinds_and_payloads_unharmed(conn, start) -> None:
    kind = "o'brien \"$$\\ kind"
    payloads = [{"s": text} for text in HOSTILE_STRINGS] + [HOSTILE_STRINGS[2]]
    job = await create_job(conn, payloads, kind=kind, payload={"j": HOSTILE_STRINGS[3]})
    start("--handler", f"{kind}=bad_handlers:echo")
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="the hostile job")
    assert await status_counts(conn, job) == {"completed": len(payloads)}
    rows = await conn.fetch(
        "SELECT seq, result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1"
        " ORDER BY seq",
        job,
    )
    for row, payload in zip(rows, payloads, strict=True):
        assert row["result"] == {
            "kind": kind,
            "payload": payload,
            "job_payload": {"j": HOSTILE_STRINGS[3]},
        }
    # Nothing else was touched by the strings that look like SQL.
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 1


def test_identifiers_that_cannot_be_bound_are_validated() -> None:
    for bad in ("chunkd; DROP", 'a"b', "a b", "A", "1abc", "", "x" * 64, "a\0b", "$$"):
        with pytest.raises(ValueError, match="invalid SQL identifier"):
            validate_identifier(bad)
    assert validate_identifier("chunkd") == "chunkd"


def test_no_sql_is_built_from_strings_in_the_daemon() -> None:
    """Every statement of the daemon is a named block of sql/queries.sql with bound values."""
    offenders = []
    pattern = re.compile(r"\.(execute|fetch|fetchval|fetchrow|executemany)\(\s*f[\"']")
    for path in sorted((ROOT / "daemon" / "chunkd").rglob("*.py")):
        if path.relative_to(ROOT / "daemon" / "chunkd").as_posix() == "testing/server.py":
            # chunkd.testing's CREATE/DROP DATABASE of names it makes itself (checked as
            # identifiers): those statements take no parameters. Not the daemon.
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0)}" for m in pattern.finditer(text)]
        offenders += [
            f"{path.name}: % formatting into SQL"
            for m in re.finditer(r"(SELECT|INSERT|UPDATE|DELETE)[^\"'\n]*[\"']\s*%\s", text)
        ]
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Privileges
# --------------------------------------------------------------------------------------------


async def test_schema_grants_nothing_to_public(conn) -> None:
    public_acl = await conn.fetch(
        """
        SELECT c.relname AS name, a.privilege_type FROM pg_class c
        CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
        WHERE c.relnamespace = 'chunkd'::regnamespace AND a.grantee = 0
        UNION ALL
        SELECT p.proname, a.privilege_type FROM pg_proc p
        CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        WHERE p.pronamespace = 'chunkd'::regnamespace AND a.grantee = 0
        UNION ALL
        SELECT n.nspname, a.privilege_type FROM pg_namespace n
        CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
        WHERE n.nspname = 'chunkd' AND a.grantee = 0
        """
    )
    assert [tuple(r) for r in public_acl] == []


async def test_a_fresh_role_can_see_and_change_nothing(conn, database, make_role) -> None:
    await create_job(conn, 2)
    role = await make_role(usage=False)
    objects = await conn.fetch(
        "SELECT c.oid, c.relname FROM pg_class c WHERE c.relnamespace = 'chunkd'::regnamespace"
        " AND c.relkind IN ('r', 'v', 'S')"
    )
    for obj in objects:
        for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            if privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE") and obj["relname"] in (
                "chunk_processing_status",
            ):
                continue
            assert not await conn.fetchval(
                "SELECT has_table_privilege($1, $2::oid, $3)", role, obj["oid"], privilege
            ), (obj["relname"], privilege)
    functions = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS f FROM pg_proc p"
        " WHERE p.pronamespace = 'chunkd'::regnamespace"
    )
    assert len(functions) > 15
    for f in functions:
        assert not await conn.fetchval(
            "SELECT has_function_privilege($1, $2::regprocedure, 'EXECUTE')", role, f["f"]
        ), f["f"]

    fresh = await connect(dsn_as(database.dsn, role))
    try:
        for statement in (
            "SELECT * FROM chunkd.sync_jobs",
            "SELECT * FROM chunkd.chunk_processing_status",
            "SELECT * FROM chunkd.chunk_events",
            "DELETE FROM chunkd.chunk_processing_queue",
            "SELECT chunkd.create_sync_job('k', '[1]')",
            "SELECT * FROM chunkd.claim_next_chunk_job_safe('me', 10)",
            "SELECT chunkd.cleanup_stuck_chunks()",
            "SELECT * FROM chunkd.reap_expired()",
            "SELECT * FROM chunkd.reap_attempts()",
            "SELECT chunkd.schema_versions()",
            "SELECT * FROM chunkd.schema_migrations",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await fresh.execute(statement)
    finally:
        await fresh.close()
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 1
    assert await status_counts(conn, await conn.fetchval("SELECT id FROM chunkd.sync_jobs")) == {
        "pending": 2
    }


async def test_daemon_runs_a_job_to_completion_with_exactly_the_worker_grants(
    conn, database, make_role, start
) -> None:
    role = await make_role(WORKER_FUNCTIONS)
    job = await create_job(conn, [{"i": i} for i in range(30)], kind="echo")
    failing = await create_job(conn, 2, kind="boom", max_attempts=2)
    daemon = start(
        "--handler", "echo=bad_handlers:echo", "--handler", "boom=bad_handlers:raises",
        "--reap-interval", "200ms", "--retry-base", "50ms", "--retry-cap", "100ms",
        "--metrics-port", str(_free_port()),  # the depth sampler calls queue_depth() too
        dsn=dsn_as(database.dsn, role),
    )  # fmt: skip
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="the echo job")
    await wait_until(lambda: _terminal(conn, failing), timeout_s=30, what="the failing job")
    assert await status_counts(conn, job) == {"completed": 30}
    assert await status_counts(conn, failing) == {"failed": 2}
    assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role), (
        "the daemon really connected as the worker role"
    )
    assert await daemon.stop() == 0
    events = daemon.events()
    problems = [e for e in events if "permission denied" in json.dumps(e)]
    assert problems == [], problems
    assert not [e for e in events if e.get("level") == "error" and e["event"] != "chunk.failed"]
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0, "deregistered"


async def test_enqueue_only_role_can_create_jobs_and_nothing_else(
    conn, database, make_role
) -> None:
    role = await make_role(ENQUEUE_FUNCTIONS)
    enqueuer = await connect(dsn_as(database.dsn, role))
    try:
        job = await enqueuer.fetchval(
            "SELECT chunkd.create_sync_job('k', $1::jsonb, '{}', 1)", json.dumps([1, 2, 3])
        )
        assert await status_counts(conn, job) == {"pending": 3}
        for statement, args in (
            ("SELECT * FROM chunkd.claim_next_chunk_job_safe('me', 1)", ()),
            ("SELECT chunkd.cancel_sync_job($1)", (job,)),
            ("SELECT chunkd.retry_failed_chunks($1)", (job,)),
            ("SELECT chunkd.get_sync_job_progress($1)", (job,)),
            ("SELECT chunkd.purge_finished_jobs('0s')", ()),
            ("SELECT chunkd.cleanup_stuck_chunks()", ()),
            ("SELECT * FROM chunkd.reap_expired()", ()),
            ("SELECT * FROM chunkd.reap_attempts()", ()),
            ("SELECT * FROM chunkd.sync_jobs", ()),
            ("SELECT * FROM chunkd.chunk_processing_queue", ()),
            ("SELECT * FROM chunkd.chunk_processing_status", ()),
            ("SELECT * FROM chunkd.chunk_events", ()),
            ("UPDATE chunkd.attempts SET outcome = 'completed'", ()),
            ("DELETE FROM chunkd.ready", ()),
            # sync_jobs shows the history too since schema version 16: no longer insertable by
            # anyone; the tables under it are refused to this role.
            ("INSERT INTO chunkd.jobs (kind, total_chunks) VALUES ('k', 1)", ()),
            ("DELETE FROM chunkd.history_jobs", ()),
            ("SELECT * FROM chunkd.retention_round()", ()),
            ("SELECT chunkd.set_retention('completed', '1 second')", ()),
            ("SELECT * FROM chunkd.job_specs('[]')", ()),
            ("SELECT chunkd.carry_grants('chunkd.seconds(float8)', 'chunkd.seconds(float8)')", ()),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await enqueuer.execute(statement, *args)
    finally:
        await enqueuer.close()
    assert await status_counts(conn, job) == {"pending": 3}
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 1


async def test_enqueue_only_role_uses_every_enqueue_option_everywhere(
    conn, database, make_role
) -> None:
    """Delayed start, dedupe keys, labels and bulk enqueue need no grant beyond the documented
    ones: through SQL, the Python client on asyncpg and on psycopg, and `chunkd enqueue`."""
    import psycopg

    import chunkd
    from chunkd.client import sync

    role = await make_role(ENQUEUE_FUNCTIONS)
    dsn = dsn_as(database.dsn, role)
    later = datetime.now(UTC) + timedelta(hours=1)
    enqueuer = await connect(dsn)
    try:
        delayed = await enqueuer.fetchval(
            "SELECT chunkd.create_sync_job('mail', '[1]', run_at => now() + interval '1 hour',"
            " dedupe_key => 'ada')"
        )
        again = await chunkd.create_sync_job(enqueuer, "mail", [2], dedupe_key="ada")
        bulk = await chunkd.create_sync_jobs(
            enqueuer,
            [{"kind": "mail", "chunks": [1], "run_at": later}, {"kind": "x", "chunks": [2]}],
        )
        created = await enqueuer.fetchval(
            "SELECT created FROM chunkd.create_jobs($1::jsonb)",
            json.dumps([{"kind": "mail", "chunks": [3], "dedupe_key": "ada"}]),
        )
        await chunkd.create_sync_job(enqueuer, "mail", [4], label="asyncpg label")
    finally:
        await enqueuer.close()
    assert again == delayed and created is False and len(bulk) == 2
    with psycopg.connect(dsn, autocommit=True) as blocking:
        assert sync.create_sync_job(blocking, "mail", [9], dedupe_key="ada") == delayed
        assert len(sync.create_sync_jobs(blocking, [{"kind": "y", "chunks": [1]}])) == 1
        sync.create_sync_job(blocking, "mail", [5], label="psycopg label")
    cli = [sys.executable, "-m", "chunkd", "enqueue", "--kind", "mail", "--dedupe-key", "bob",
           "--in", "15m", "--label", "cli label", "-"]  # fmt: skip
    env = {**_env_with_tests(), "CHUNKD_DSN": dsn}
    run = functools.partial(
        subprocess.run, cli, input="[1]", capture_output=True, text=True, timeout=60, env=env
    )
    first = await asyncio.to_thread(run)
    second = await asyncio.to_thread(run)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and "nothing created" in second.stderr
    statuses = await conn.fetch(
        "SELECT s.overall_status, count(*) AS n FROM chunkd.chunk_processing_status s"
        " GROUP BY 1 ORDER BY 1"
    )
    assert [(r["overall_status"], r["n"]) for r in statuses] == [("pending", 4), ("scheduled", 3)]
    labels = await conn.fetch("SELECT label FROM chunkd.sync_jobs WHERE label IS NOT NULL")
    assert sorted(r["label"] for r in labels) == ["asyncpg label", "cli label", "psycopg label"]


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------

PASSWORD = "Pw-S3cret-8d1f"
TOKEN = "SECRET-TOKEN-5e2a"


async def test_dsn_password_and_header_values_never_reach_the_logs(conn, database, start) -> None:
    # The throwaway cluster trusts local connections, so the password is accepted and unused.
    dsn = dsn_as(database.dsn, "postgres", PASSWORD)
    web = await create_job(conn, 2, kind="web", max_attempts=2)
    ok = await create_job(conn, 3, kind="echo")
    env_dump = await create_job(conn, 1, kind="env")
    daemon = start(
        "--handler", "web=http://127.0.0.1:9/never",
        "--handler", "echo=bad_handlers:echo",
        "--handler", "env=exec:env",
        "--http-header", f"Authorization: Bearer {TOKEN}",
        "--retry-base", "50ms", "--retry-cap", "100ms",
        dsn=dsn,
        env={
            "CHUNKD_HTTP_HEADERS": f"X-Api-Key: {TOKEN}",
            "DATABASE_URL": dsn,
            "CHUNKD_LOG_LEVEL": "debug",
        },
    )  # fmt: skip
    for job in (web, ok, env_dump):
        await wait_until(lambda job=job: _terminal(conn, job), timeout_s=30, what=f"job {job}")
    assert await status_counts(conn, web) == {"failed": 2}
    # Cut the daemon's connections so reconnect paths log too.
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name LIKE 'chunkd%' AND datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )

    async def reconnected() -> bool:
        return [e["event"] for e in daemon.events()].count("listener.connected") >= 2

    await wait_until(reconnected, timeout_s=15, what="the listener to reconnect")
    assert await daemon.stop() == 0
    text = daemon.log_text()
    assert "daemon.starting" in text and "chunk.completed" in text and "chunk.failed" in text
    assert PASSWORD not in text and TOKEN not in text
    errors = await conn.fetch("SELECT error FROM chunkd.chunk_events WHERE error IS NOT NULL")
    assert errors and not [e for e in errors if PASSWORD in e[0] or TOKEN in e[0]]
    # exec: children get the environment without the daemon's secrets.
    (result,) = await conn.fetch(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", env_dump
    )
    dumped = json.dumps(result["result"])
    assert "PATH=" in dumped
    assert PASSWORD not in dumped and TOKEN not in dumped
    for name in ("CHUNKD_DSN", "DATABASE_URL", "CHUNKD_HTTP_HEADERS"):
        assert f"{name}=" not in dumped


@pytest.mark.parametrize(
    ("dsn", "code"),
    [
        # Refused (nothing listens on port 9): 75, worth trying again.
        (f"postgresql://someone:{PASSWORD}@127.0.0.1:9/db", 75),
        (f"postgresql://someone@127.0.0.1:9/db?password={PASSWORD}", 75),
        (f"host=127.0.0.1 port=9 user=someone password={PASSWORD} dbname=db", 75),
        (f"host=127.0.0.1 port=9 user=someone password='{PASSWORD} \\' x' dbname=db", 75),
        # Malformed: 2, a configuration error.
        (f"postgresql://someone:{PASSWORD}@[::1:9/db", 2),
        (f"postgresql:/someone:{PASSWORD}@127.0.0.1:9/db", 2),
        (f"host=127.0.0.1 password='{PASSWORD}", 2),
    ],
    ids=["userinfo", "query", "key-value", "key-value-quoted", "malformed", "typo", "unclosed"],
)
@pytest.mark.parametrize("command", [["migrate"], ["run", "--handler", "x=bad_handlers:echo"]])
def test_connect_errors_never_echo_the_password(dsn: str, code: int, command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chunkd.cli", *command, "--dsn", dsn],
        capture_output=True, text=True, timeout=60,
        env={**_env_with_tests(), "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    assert PASSWORD not in out, out
    assert out.startswith("chunkd: error: ") and len(out.strip().splitlines()) == 1, out


def test_redact_dsn_hides_every_password_form() -> None:
    for dsn in (
        f"postgresql://u:{PASSWORD}@h/db",
        f"postgres://u:{PASSWORD}@h:5432/db?sslmode=require",
        f"postgresql://u@h/db?password={PASSWORD}&sslmode=require",
        f"host=h password={PASSWORD} user=u",
        f"host=h password='{PASSWORD} x' user=u",
        f"host=h password='it\\'s {PASSWORD}' user=u",
        f"host=h password = {PASSWORD}\\ x user=u",
        f"postgresql:/u:{PASSWORD}@h/db",
    ):
        assert PASSWORD not in redact_dsn(dsn), dsn
    # What a message may echo, in any of the DSN's forms (percent-encoded or not).
    for dsn in (
        f"postgresql://u:{quote(PASSWORD + '/x', safe='')}@h/db",
        f"postgresql://u@h/db?password={quote(PASSWORD + '/x', safe='')}",
        f"host=h user=u password='{PASSWORD}/x'",
    ):
        message = f"auth failed for {PASSWORD}/x ({quote(PASSWORD + '/x', safe='')})"
        assert PASSWORD not in scrub_password(message, dsn), dsn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_with_tests() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])
    )
    return env
