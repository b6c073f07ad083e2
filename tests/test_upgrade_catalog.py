"""Every released schema version upgrades to the same catalog as a fresh install.

For each version 1 through 8, a database is built from that version's own migration files,
given live work in every state through that version's functions (tests/upgrade_state.py),
then upgraded by ``chunkd migrate``: its ``pg_dump --schema-only --schema=chunkd``, normalised
for ordering, equals a fresh database's, grants and owners included. The upgraded queue then
still works: its pending work is claimable and completes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from catalog import first_difference, schema_dump
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations, check_version
from chunkd.db.released import DAEMON_CALLS
from chunkd.db.sql_files import migrations
from resources import missing
from sql_helpers import claim, complete
from upgrade_state import build_live_state

RELEASED = range(1, 9)
ROOT = Path(__file__).resolve().parents[1]


async def _fresh_database(pg_server, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await connect(pg_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def _drop(pg_server, name: str) -> None:
    admin = await connect(pg_server.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def fresh_catalog(pg_server) -> list[str]:
    name = await _fresh_database(pg_server, "chunkd_fresh")
    try:
        conn = await connect(pg_server.dsn(name))
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        return schema_dump(pg_server.dsn(name))
    finally:
        await _drop(pg_server, name)


@pytest.mark.parametrize("version", RELEASED)
async def test_a_live_database_of_each_released_version_upgrades_to_the_fresh_catalog(
    pg_server, fresh_catalog: list[str], version: int
) -> None:
    name = await _fresh_database(pg_server, f"chunkd_v{version}")
    dsn = pg_server.dsn(name)
    try:
        conn = await connect(dsn)
        try:
            assert (await apply_migrations(conn, up_to=version)).versions == list(
                range(1, version + 1)
            )
            jobs = await build_live_state(conn, version)
            migrated = await apply_migrations(conn)
            assert migrated.versions == [m.version for m in migrations() if m.version > version]
            assert migrated.definitions, "the current definitions are applied on an upgrade"
            await check_version(conn)
            # The upgraded queue works: the pending job's chunks are claimed and complete.
            rows = await claim(conn, "upgraded", 10, kinds=["pending"])
            assert sorted(r["seq"] for r in rows) == [0, 1, 2]
            for r in rows:
                assert await complete(conn, r["queue_id"], "upgraded", r["attempt"])
            status = await conn.fetchval(
                "SELECT overall_status FROM chunkd.chunk_processing_status"
                " WHERE parent_sync_job_id = $1",
                jobs["pending"],
            )
            assert status == "completed"
        finally:
            await conn.close()
        upgraded = schema_dump(dsn)
        assert upgraded == fresh_catalog, first_difference(fresh_catalog, upgraded)
    finally:
        await _drop(pg_server, name)


# The last commit of release 0.2.0, whose docs/security.md gave the roles their grants.
RELEASE_0_2 = "415dfcf87de7011b402f54eb90c261813f32f13d"
ROLES = {"chunkd_worker": "chunkd_upgrade_worker", "chunkd_enqueue": "chunkd_upgrade_enqueue"}


def _grants(page: str) -> dict[str, list[str]]:
    """The functions a security.md grants EXECUTE on to the worker and the enqueue role, by
    this test's role."""
    found = {}
    for documented, role in ROLES.items():
        block = re.search(
            rf"GRANT EXECUTE ON FUNCTION\s+((?:(?!GRANT).)*?)\s+TO {documented};", page, re.DOTALL
        )
        assert block, documented
        found[role] = re.findall(r"chunkd\.\w+\([^)]*\)", block[1])
    return found


async def _grant(conn, grants: dict[str, list[str]]) -> None:
    for role, functions in grants.items():
        await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {role}")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION {', '.join(functions)} TO {role}")


def _security_page_of_0_2() -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        missing("git and this repository's history are needed to read 0.2.0's security.md")
    shown = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{RELEASE_0_2}:docs/security.md"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if shown.returncode != 0:
        missing(f"commit {RELEASE_0_2[:12]} (release 0.2.0) is not in this clone's history")
    return shown.stdout


@pytest.fixture
async def grant_roles(pg_server) -> AsyncIterator[None]:
    admin = await connect(pg_server.admin_dsn)
    try:
        for role in ROLES.values():
            await admin.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role}")
        yield
    finally:
        for role in ROLES.values():
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_0_2_grants_upgrade_to_today_s_and_keep_what_0_2_daemons_call(
    pg_server, grant_roles: None
) -> None:
    """A 0.2 database whose worker and enqueue roles hold what 0.2's docs/security.md gave
    them ends, after chunkd migrate, with the grants of a fresh database given today's
    docs/security.md, and those of 0.2's that 0.2's daemon calls and this release keeps (its
    daemons may still run: a rolling upgrade); nothing else."""
    released = _grants(_security_page_of_0_2())
    today = _grants((ROOT / "docs" / "security.md").read_text(encoding="utf-8"))
    assert (
        "chunkd.claim_or_wait(text, int, text[], float8, float8)"
        in released[ROLES["chunkd_worker"]]
    )
    assert "chunkd.create_sync_jobs(jsonb)" in released[ROLES["chunkd_enqueue"]]
    fresh = await _fresh_database(pg_server, "chunkd_g_fresh")
    upgraded = await _fresh_database(pg_server, "chunkd_g_v8")
    try:
        conn = await connect(pg_server.dsn(fresh))
        try:
            await apply_migrations(conn)
            await _grant(conn, today)
            kept = {}
            for role, functions in released.items():
                now = {
                    await conn.fetchval("SELECT to_regprocedure($1)::text", f) for f in today[role]
                }
                old = [f for f in functions if await conn.fetchval("SELECT to_regprocedure($1)", f)]
                kept[role] = [
                    f
                    for f in old
                    if await conn.fetchval("SELECT to_regprocedure($1)::text", f) not in now
                ]
            called = {re.sub(r"^chunkd\.(\w+)\(.*", r"\1", f) for fs in kept.values() for f in fs}
            assert called and called <= DAEMON_CALLS["0.2.0"], called
            await _grant(conn, {role: fs for role, fs in kept.items() if fs})
        finally:
            await conn.close()
        conn = await connect(pg_server.dsn(upgraded))
        try:
            await apply_migrations(conn, up_to=8)
            await _grant(conn, released)
            await build_live_state(conn, 8)
            await apply_migrations(conn)
        finally:
            await conn.close()
        expected, found = schema_dump(pg_server.dsn(fresh)), schema_dump(pg_server.dsn(upgraded))
        assert any("chunkd_upgrade_worker" in entry for entry in found), "the grants are dumped"
        assert found == expected, first_difference(expected, found)
    finally:
        for name in (fresh, upgraded):
            await _drop(pg_server, name)
