"""Every released schema version upgrades to the same catalog as a fresh install.

For each version 1 through 8, a database is built from that version's own migration files,
given live work in every state through that version's functions (tests/upgrade_state.py),
then upgraded by ``chunkd migrate``: its ``pg_dump --schema-only --schema=chunkd``, normalised
for ordering, equals a fresh database's, grants and owners included. The upgraded queue then
still works: its pending work is claimable and completes.
"""

from __future__ import annotations

import uuid

import pytest

from catalog import first_difference, schema_dump
from chunkd.db import connect
from chunkd.db.migrate import apply_migrations, check_version
from chunkd.db.sql_files import migrations
from sql_helpers import claim, complete
from upgrade_state import build_live_state

RELEASED = range(1, 9)


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
