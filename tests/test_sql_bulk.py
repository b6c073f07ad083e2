"""create_sync_jobs: many jobs in one call and one transaction, ids in input order, all or
nothing, errors that name the job; carry_grants and the upgrade from schema version 2."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from enqueue_helpers import create_sync_jobs, db_time, job_count, overall_status


async def test_ids_come_back_in_input_order_with_every_option_stored(conn) -> None:
    later = await db_time(conn, 3600)
    jobs = [
        {"kind": "mail", "chunks": [{"page": 0}, {"page": 1}], "payload": {"box": "a"}},
        {
            "kind": "export",
            "chunks": ["t1"],
            "max_concurrency": 1,
            "max_attempts": 5,
            "priority": 7,
            "run_at": later.isoformat(),
            "dedupe_key": "export-t1",
        },
        {"kind": "mail", "chunks": [{"page": 0}], "payload": None, "priority": None},
    ]
    ids = await create_sync_jobs(conn, jobs)
    assert len(ids) == 3 and len(set(ids)) == 3
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, kind, payload, max_concurrency, max_attempts, priority, total_chunks,"
            " run_at, dedupe_key FROM chunkd.sync_jobs"
        )
    }
    got = [rows[i] for i in ids]
    assert [r["kind"] for r in got] == ["mail", "export", "mail"]
    assert [r["total_chunks"] for r in got] == [2, 1, 1]
    assert [r["payload"] for r in got] == [{"box": "a"}, {}, {}]
    assert (got[1]["max_concurrency"], got[1]["max_attempts"], got[1]["priority"]) == (1, 5, 7)
    assert (got[1]["run_at"], got[1]["dedupe_key"]) == (later, "export-t1")
    assert (got[0]["max_attempts"], got[0]["priority"], got[0]["run_at"]) == (3, 0, None)
    assert [await overall_status(conn, i) for i in ids] == ["pending", "scheduled", "pending"]
    chunks = await conn.fetch(
        "SELECT seq, payload FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1 ORDER BY seq",
        ids[0],
    )
    assert [(c["seq"], c["payload"]) for c in chunks] == [(0, {"page": 0}), (1, {"page": 1})]


async def test_a_thousand_jobs_in_one_call_send_one_wakeup(database, conn) -> None:
    listener = await connect(database.dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("chunkd", lambda *args: received.put_nowait(args[3]))
    try:
        ids = await create_sync_jobs(conn, [{"kind": "k", "chunks": [i]} for i in range(1000)])
        assert len(set(ids)) == 1000
        assert await asyncio.wait_for(received.get(), 5) == "0"
        await conn.execute("SELECT pg_notify('chunkd', 'marker')")
        assert await asyncio.wait_for(received.get(), 5) == "marker", "exactly one wake-up"
    finally:
        await listener.close()
    assert await conn.fetchval("SELECT count(*) FROM chunkd.ready") == 1000


async def test_an_empty_array_creates_nothing(conn) -> None:
    assert await create_sync_jobs(conn, []) == []
    assert await job_count(conn) == 0


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ('{"kind": "k"}', "jobs must be a JSON array of job objects, got object"),
        ("null", "jobs must be a JSON array of job objects, got null"),
        ('[{"kind": "k", "chunks": [1]}, 7]', "jobs[1]: must be a JSON object, got number"),
        (
            '[{"kind": "k", "chunks": [1]}, {"kind": "k", "chunk": [1]}]',
            'jobs[1]: unknown key "chunk" (keys: kind, chunks, payload, max_concurrency,'
            " max_attempts, priority, run_at, dedupe_key, open, on_finish_kind, max_per_second,"
            " concurrency_key, traceparent, label)",
        ),
        (
            '[{"kind": "k", "chunks": {"a": 1}}]',
            "jobs[0]: chunks must be a JSON array of chunk payloads, got object",
        ),
        ('[{"kind": "k"}]', "jobs[0]: chunks must be a JSON array of chunk payloads, got null"),
        ('[{"kind": "k", "chunks": []}]', "jobs[0]: chunks must not be empty"),
        ('[{"chunks": [1]}]', "jobs[0]: kind must be a non-empty text of at most 200 characters"),
        (
            '[{"kind": "k", "chunks": [1]}, {"kind": "k", "chunks": [1], "run_at": "soon"}]',
            'jobs[1].run_at: invalid input syntax for type timestamp with time zone: "soon"',
        ),
        (
            '[{"kind": "k", "chunks": [1], "run_at": "2026-13-01T00:00:00Z"}]',
            'jobs[0].run_at: date/time field value out of range: "2026-13-01T00:00:00Z"',
        ),
        (
            '[{"kind": "k", "chunks": [1], "max_concurrency": 1.5}]',
            'jobs[0].max_concurrency: invalid input syntax for type integer: "1.5"',
        ),
        (
            '[{"kind": "k", "chunks": [1], "dedupe_key": ""}]',
            "jobs[0]: dedupe_key must not be empty (NULL: no key)",
        ),
        (
            '[{"kind": "k", "chunks": [1], "max_concurrency": 0}]',
            "jobs[0]: max_concurrency must be NULL (unlimited) or >= 1, got 0",
        ),
        (
            '[{"kind": "k", "chunks": [1], "max_attempts": null}]',
            "jobs[0]: max_attempts must be >= 1, got <NULL>",
        ),
    ],
    ids=[
        "object",
        "null",
        "not-an-object",
        "unknown-key",
        "chunks-object",
        "chunks-missing",
        "chunks-empty",
        "kind-missing",
        "run-at-not-a-time",
        "run-at-out-of-range",
        "int-not-integral",
        "empty-key",
        "concurrency-0",
        "attempts-null",
    ],
)
async def test_a_bad_job_is_named_and_nothing_is_written(conn, jobs: str, message: str) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.fetch("SELECT chunkd.create_sync_jobs($1::jsonb)", jobs)
    assert str(refused.value) == f"chunkd: {message}"
    assert refused.value.sqlstate == "22023"
    assert await job_count(conn) == 0
    assert await conn.fetchval("SELECT count(*) FROM chunkd.chunks") == 0


async def test_a_limit_in_one_job_refuses_the_whole_call(conn) -> None:
    jobs = [{"kind": "k", "chunks": [1]}, {"kind": "k", "chunks": [1], "payload": "x" * 2**21}]
    with pytest.raises(asyncpg.ProgramLimitExceededError, match=r"^chunkd: jobs\[1\]: job payload"):
        await create_sync_jobs(conn, jobs)
    assert await job_count(conn) == 0


# --------------------------------------------------------------------------------------------
# Grants over changed signatures
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def role(conn) -> str:
    name = f"chunkd_bulk_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"CREATE ROLE {name} LOGIN")
    yield name
    await conn.execute(f"DROP OWNED BY {name}")
    await conn.execute(f"DROP ROLE {name}")


async def test_carry_grants_gives_the_new_function_the_old_ones_grantees(conn, role) -> None:
    await conn.execute("CREATE FUNCTION chunkd.old_f(int) RETURNS int LANGUAGE sql RETURN 1")
    await conn.execute("CREATE FUNCTION chunkd.new_f(int, text) RETURNS int LANGUAGE sql RETURN 2")
    await conn.execute("REVOKE ALL ON FUNCTION chunkd.new_f(int, text) FROM PUBLIC")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.old_f(int) TO {role} WITH GRANT OPTION")
    carried = await conn.fetchval(
        "SELECT chunkd.carry_grants('chunkd.old_f(int)', 'chunkd.new_f(int, text)')"
    )
    assert carried == 1
    acl = await conn.fetch(
        "SELECT r.rolname, a.is_grantable FROM pg_proc p"
        " CROSS JOIN LATERAL aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE p.oid = 'chunkd.new_f(int, text)'::regprocedure AND a.grantee <> p.proowner"
    )
    assert [(r["rolname"], r["is_grantable"]) for r in acl] == [(role, True)]
    # Nothing granted: nothing carried (and PUBLIC is never a grantee here).
    assert (
        await conn.fetchval(
            "SELECT chunkd.carry_grants('chunkd.new_f(int, text)', 'chunkd.old_f(int)')"
        )
        == 1
    )
    assert (
        await conn.fetchval(
            "SELECT chunkd.carry_grants('chunkd.cleanup_stuck_chunks()', 'chunkd.old_f(int)')"
        )
        == 0
    )


async def test_upgrading_from_version_2_keeps_whoever_could_enqueue_enqueuing(
    empty_database: str, role: str
) -> None:
    conn = await connect(empty_database)
    try:
        assert (await apply_migrations(conn, up_to=2)).versions == [1, 2]
        await conn.execute(
            f"GRANT USAGE ON SCHEMA chunkd TO {role};"
            f" GRANT EXECUTE ON FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int)"
            f" TO {role}"
        )
        assert (await apply_migrations(conn)).versions == [m.version for m in migrations()[2:]]
        await conn.execute(f"SET ROLE {role}")
        job = await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1]', dedupe_key => 'x')")
        assert (
            await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1, 2]', dedupe_key => 'x')")
            == job
        )
        (bulk,) = await conn.fetch(
            'SELECT chunkd.create_sync_jobs(\'[{"kind": "k", "chunks": [1]}]\')'
        )
        created = await conn.fetchval(
            "SELECT created FROM chunkd.create_jobs($1::jsonb, true)",
            json.dumps([{"kind": "k", "chunks": [1], "dedupe_key": "x"}]),
        )
        assert created is False and bulk[0] != job
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM chunkd.jobs")
        await conn.execute("RESET ROLE")
        old = await conn.fetchval(
            "SELECT to_regprocedure('chunkd.create_sync_job(text, jsonb, jsonb, int, int, int)')"
        )
        assert old is None, "the old signature is gone"
    finally:
        await conn.close()
        # DROP OWNED in the role fixture runs in the test database; this one goes with its own.
        admin = await connect(empty_database)
        try:
            await admin.execute(f"DROP OWNED BY {role}")
        finally:
            await admin.close()
