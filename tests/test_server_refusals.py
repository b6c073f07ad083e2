"""Server refusals are one line naming what is missing, exit 2, and nothing written (issue #16,
item 7; issue #11, fix 3).

Inputs: ``chunkd migrate``, ``run`` and ``enqueue`` against (a) a role without CREATE on the
database, (b) a database with ``default_transaction_read_only = on``, (c) a role without
EXECUTE on the functions, (d) a role without USAGE on the schema. Where the line gives a GRANT,
the test runs that very GRANT and shows it fixes what was named. Also: the owner of a schema a
DBA created beforehand migrates it without CREATE on the database, and ``migrate`` refuses a
schema (or an object in it) owned by another role.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.migrate import daemon_functions
from daemon_helpers import CliRun, run_chunkd, wait_until
from sql_helpers import create_job, status_counts

RUN = ["run", "--handler", "echo=bad_handlers:echo"]
ENQUEUE = ["enqueue", "--kind", "echo", "-"]


def dsn_as(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{quote(user)}@{parts.netloc.rpartition('@')[2]}"))


async def chunkd(*args: str, dsn: str) -> CliRun:
    stdin = b"[1, 2]" if args[0] == "enqueue" else b""
    return await asyncio.to_thread(run_chunkd, *args, "--dsn", dsn, stdin=stdin)


async def refused(*args: str, dsn: str) -> str:
    """Runs a command that must be refused: exit 2, nothing on stdout; returns the line."""
    if args[0] == "run":
        # A daemon that got past its start-up checks would run until stopped: bounded here.
        result = await asyncio.wait_for(chunkd(*args, dsn=dsn), timeout=30)
    else:
        result = await chunkd(*args, dsn=dsn)
    assert result.code == 2, (args, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout
    return result.one_error_line()


def grant_in(line: str) -> str:
    match = re.search(r"GRANT [^;]+;", line)
    assert match, f"no GRANT in {line!r}"
    return match[0]


Role = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_role(pg_server) -> AsyncIterator[Role]:
    """LOGIN roles, dropped afterwards with whatever they own in the given databases."""
    made: list[tuple[str, list[str]]] = []

    async def _make(*databases: str) -> str:
        role = f"chunkd_ref_{uuid.uuid4().hex[:10]}"
        admin = await connect(pg_server.admin_dsn)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN")
        finally:
            await admin.close()
        made.append((role, list(databases)))
        return role

    yield _make
    for role, databases in made:
        for dsn in databases:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    role,
                )
                await conn.execute(f"DROP OWNED BY {role}")
            finally:
                await conn.close()
        admin = await connect(pg_server.admin_dsn)
        try:
            await admin.execute(f"DROP ROLE {role}")
        finally:
            await admin.close()


async def _schema_of(dsn: str) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'chunkd'"
        )
    finally:
        await conn.close()


async def _as_superuser(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# (a) no CREATE on the database; a schema a DBA created beforehand
# --------------------------------------------------------------------------------------------


async def test_no_create_on_the_database(empty_database: str, make_role: Role) -> None:
    role = await make_role(empty_database)
    dsn = dsn_as(empty_database, role)
    database = urlsplit(empty_database).path.lstrip("/")
    line = await refused("migrate", dsn=dsn)
    assert line == (
        f"role {role} may not create schema chunkd in database {database}: "
        f"GRANT CREATE ON DATABASE {database} TO {role}; "
        f"or have a DBA run CREATE SCHEMA chunkd AUTHORIZATION {role};"
    )
    assert await _schema_of(empty_database) is None, "nothing written"
    assert "no chunkd schema: run `chunkd migrate`" in await refused(*RUN, dsn=dsn)
    assert "chunkd migrate" in await refused(*ENQUEUE, dsn=dsn)
    assert await _schema_of(empty_database) is None
    # The GRANT the line gives is what it takes.
    await _as_superuser(empty_database, grant_in(line))
    result = await chunkd("migrate", dsn=dsn)
    assert result.code == 0, result.stderr
    assert await _schema_of(empty_database) == role


async def test_owner_of_a_schema_made_by_a_dba_migrates_without_create_on_the_database(
    empty_database: str, make_role: Role, start
) -> None:
    role = await make_role(empty_database)
    dsn = dsn_as(empty_database, role)
    await _as_superuser(empty_database, f"CREATE SCHEMA chunkd AUTHORIZATION {role}")
    result = await chunkd("migrate", dsn=dsn)
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("applied migration(s) 1, 2")
    check = await chunkd("migrate", "--check", dsn=dsn)
    assert check.code == 0, check.stderr
    enqueued = await chunkd(*ENQUEUE, dsn=dsn)
    assert enqueued.code == 0, enqueued.stderr
    job = enqueued.stdout.strip()
    daemon = start(*RUN[1:], dsn=dsn)
    conn = await connect(empty_database)
    try:

        async def done() -> bool:
            return await status_counts(conn, job) == {"completed": 2}

        await wait_until(done, timeout_s=30, what="the job, run by the schema's owner")
    finally:
        await conn.close()
    assert await daemon.stop() == 0


# --------------------------------------------------------------------------------------------
# (b) a read-only database
# --------------------------------------------------------------------------------------------


async def test_read_only_database(pg_server, database, empty_database: str) -> None:
    for dsn in (database.dsn, empty_database):
        name = urlsplit(dsn).path.lstrip("/")
        await _as_superuser(dsn, f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    expected = "the database is read-only (default_transaction_read_only is on"
    assert (await refused("migrate", dsn=empty_database)).startswith(expected)
    assert await _schema_of(empty_database) is None
    assert (await refused(*RUN, dsn=database.dsn)).startswith(expected)
    assert (await refused(*ENQUEUE, dsn=database.dsn)).startswith(expected)
    conn = await connect(database.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0
        assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0
    finally:
        await conn.close()
    # A current schema needs nothing written: migrate says so, read-only or not.
    current = await chunkd("migrate", dsn=database.dsn)
    assert current.code == 0 and "already current" in current.stdout


# --------------------------------------------------------------------------------------------
# (c) no EXECUTE on the functions; (d) no USAGE on the schema
# --------------------------------------------------------------------------------------------


async def test_no_usage_then_no_execute_each_named_with_the_grant(
    database, conn, make_role: Role, start
) -> None:
    role = await make_role(database.dsn)
    dsn = dsn_as(database.dsn, role)
    # (d) no USAGE on the schema.
    usage = f"GRANT USAGE ON SCHEMA chunkd TO {role};"
    for command in (RUN, ENQUEUE, ["status"]):
        assert await refused(*command, dsn=dsn) == (
            f"role {role} has no USAGE on schema chunkd: {usage} (as the schema's owner)"
        )
    assert (await refused("migrate", dsn=dsn)).startswith(
        f"schema chunkd is owned by role postgres, not by {role} who runs chunkd migrate"
    )
    await conn.execute(usage)
    # (c) USAGE, but no EXECUTE: the first function each command needs is named.
    line = await refused(*RUN, dsn=dsn)
    assert line.startswith(f"role {role} may not execute chunkd.schema_versions()")
    await conn.execute(grant_in(line))
    line = await refused(*RUN, dsn=dsn)
    others = len(daemon_functions()) - 2  # schema_versions granted; the first one named
    assert re.match(
        rf"role {role} may not execute chunkd\.\w+\(.*\) and {others} more, which chunkd run "
        rf"calls: GRANT EXECUTE ON FUNCTION .* TO {role}; \(docs/security.md: the worker role\)$",
        line,
    ), line
    assert await refused(*ENQUEUE, dsn=dsn) == (
        f"role {role} may not execute chunkd.create_jobs: ask the schema's owner for "
        f"GRANT EXECUTE ON FUNCTION chunkd.create_jobs(...) TO {role}; "
        "(docs/security.md lists the grants of each role)"
    )
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0
    # The GRANT the daemon named is exactly what it lacked: it now runs a job.
    await conn.execute(grant_in(line))
    job = await create_job(conn, 3, kind="echo")
    daemon = start(*RUN[1:], dsn=dsn)

    async def done() -> bool:
        return await status_counts(conn, job) == {"completed": 3}

    await wait_until(done, timeout_s=30, what="the job, under the granted role")
    assert await daemon.stop() == 0


# --------------------------------------------------------------------------------------------
# A schema, or something in it, owned by another role (issue #11, fix 3)
# --------------------------------------------------------------------------------------------


async def test_migrate_refuses_a_schema_owned_by_another_role(
    empty_database: str, make_role: Role
) -> None:
    other = await make_role(empty_database)
    # The other role prepared a trap: a trigger that would run as whoever migrates.
    await _as_superuser(
        empty_database,
        f"""
        CREATE SCHEMA chunkd AUTHORIZATION {other};
        SET ROLE {other};
        CREATE TABLE chunkd.schema_migrations (version int PRIMARY KEY, name text,
                                               applied_at timestamptz DEFAULT now());
        CREATE TABLE chunkd.ran_as (who text);
        CREATE FUNCTION chunkd.trap() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO chunkd.ran_as VALUES (current_user); RETURN NEW; END $$;
        CREATE TRIGGER trap BEFORE INSERT ON chunkd.schema_migrations
            FOR EACH ROW EXECUTE FUNCTION chunkd.trap();
        GRANT ALL ON SCHEMA chunkd TO PUBLIC;
        GRANT ALL ON chunkd.schema_migrations, chunkd.ran_as TO PUBLIC;
        """,  # noqa: S608 - a generated role name
    )
    line = await refused("migrate", dsn=empty_database)
    assert line.startswith(
        f"schema chunkd is owned by role {other}, not by postgres who runs chunkd migrate: "
        f"run chunkd migrate as {other}"
    )
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chunkd.ran_as") == 0
        assert await conn.fetchval("SELECT count(*) FROM chunkd.schema_migrations") == 0
        assert await conn.fetchval("SELECT to_regclass('chunkd.sync_jobs')") is None
    finally:
        await conn.close()


async def test_migrate_refuses_an_object_of_another_role_in_its_own_schema(
    empty_database: str, make_role: Role
) -> None:
    other = await make_role(empty_database)
    await _as_superuser(
        empty_database,
        f"""
        CREATE SCHEMA chunkd;
        GRANT CREATE, USAGE ON SCHEMA chunkd TO {other};
        SET ROLE {other};
        CREATE FUNCTION chunkd.schema_versions() RETURNS int[] LANGUAGE sql
            AS $$ SELECT '{{}}'::int[] $$;
        """,
    )
    line = await refused("migrate", dsn=empty_database)
    assert line == (
        f"schema chunkd holds function chunkd.schema_versions() (owned by {other}), not owned "
        "by postgres who owns the schema and runs chunkd migrate: drop it or change its owner "
        "first"
    )
