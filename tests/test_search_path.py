"""Built-ins resolve in pg_catalog, whatever the caller's search_path (issue #11, fix 3).

The input: a role that owns ``public.pg_advisory_lock(integer)`` (an exact match where
pg_catalog only has ``pg_advisory_lock(bigint)``), and a superuser running ``chunkd migrate``
with the default search_path: the other role's code must not run. The same for the daemon and
the CLI through a transaction pooler, where chunkd cannot pin search_path and relies on every
built-in in ``sql/queries.sql`` being called as ``pg_catalog.NAME``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.sql_files import queries
from daemon_helpers import run_chunkd, wait_until
from sql_helpers import create_job, status_counts

# SQL words followed by "(" that are syntax, not function calls.
_SYNTAX = {
    "and", "any", "array", "as", "coalesce", "exists", "extract", "filter", "from", "greatest",
    "in", "join", "lateral", "not", "on", "or", "over", "select", "then", "values", "when",
    "where", "with",
}  # fmt: skip


def _code_only(sql: str) -> str:
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


@pytest.mark.parametrize("name", sorted(queries()))
def test_every_function_call_in_queries_sql_is_schema_qualified(name: str) -> None:
    calls = re.findall(r"(?<![\w.$])([A-Za-z_][A-Za-z0-9_]*)\s*\(", _code_only(queries()[name]))
    unqualified = [c for c in calls if c.lower() not in _SYNTAX]
    assert unqualified == [], f"{name}: call these as pg_catalog.NAME (or chunkd.NAME)"


TROJAN_SQL = """
CREATE TABLE public.pwned (who text, what text);
GRANT INSERT ON public.pwned TO PUBLIC;
CREATE FUNCTION public.pg_advisory_lock(integer) RETURNS void LANGUAGE sql
    AS $$ INSERT INTO public.pwned VALUES (current_user, 'pg_advisory_lock') $$;
CREATE FUNCTION public.pg_advisory_unlock(integer) RETURNS boolean LANGUAGE sql
    AS $$ INSERT INTO public.pwned VALUES (current_user, 'pg_advisory_unlock') RETURNING true $$;
CREATE FUNCTION public.unnest(integer[]) RETURNS SETOF integer LANGUAGE sql
    AS $$ INSERT INTO public.pwned VALUES (current_user, 'unnest') RETURNING 1 $$;
"""


@pytest.fixture
async def trojan_role(pg_server) -> AsyncIterator[str]:
    """A role that may create objects in schema public (as on PostgreSQL < 15 for everyone)."""
    role = f"chunkd_evil_{uuid.uuid4().hex[:8]}"
    admin = await connect(pg_server.admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        yield role
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.close()


async def _plant(dsn: str, role: str) -> None:
    """As the superuser: let ``role`` create in public; as ``role``: plant the trojans."""
    admin = await asyncpg.connect(dsn)  # a plain connection: the default search_path
    try:
        await admin.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        await admin.execute(f"SET ROLE {role}")
        await admin.execute(TROJAN_SQL)
        await admin.execute("RESET ROLE")
        assert await admin.fetchval("SHOW search_path") == '"$user", public'
    finally:
        await admin.close()


async def _cleanup(dsn: str, role: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"DROP OWNED BY {role}")
    finally:
        await admin.close()
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


async def _pwned(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT who, what FROM public.pwned")]
    finally:
        await conn.close()


async def test_migrate_as_superuser_runs_no_code_of_another_role(
    empty_database: str, trojan_role: str
) -> None:
    await _plant(empty_database, trojan_role)
    try:
        # The control: an unqualified call from a default session does reach the trojan.
        probe = await asyncpg.connect(empty_database)
        try:
            await probe.execute("SELECT pg_advisory_lock(hashtext('x'))")
            assert await _pwned(empty_database) == [("postgres", "pg_advisory_lock")]
            await probe.execute("DELETE FROM public.pwned")
        finally:
            await probe.close()
        result = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database)
        assert result.code == 0, result.stderr
        assert await _pwned(empty_database) == []
    finally:
        await _cleanup(empty_database, trojan_role)


async def test_daemon_and_cli_without_a_pinned_search_path_run_no_code_of_another_role(
    database, conn, start, trojan_role: str
) -> None:
    """--pooler transaction: no search_path is pinned, so only the qualified calls protect."""
    await _plant(database.dsn, trojan_role)
    try:
        job = await create_job(conn, 3, kind="echo")
        env = {"CHUNKD_POOLER": "transaction"}
        daemon = start("--handler", "echo=bad_handlers:echo", env=env)

        async def done() -> bool:
            return await status_counts(conn, job) == {"completed": 3}

        await wait_until(done, timeout_s=30, what="the job, through the daemon")
        for command in (["status"], ["workers"], ["cancel", str(job)], ["migrate", "--check"]):
            await asyncio.to_thread(run_chunkd, *command, "--dsn", database.dsn, env=env)
        assert await daemon.stop() == 0
        assert await _pwned(database.dsn) == []
    finally:
        await _cleanup(database.dsn, trojan_role)
