"""Upgrading a live schema version 2 database to flow control (migration 3): work in flight
keeps its claim, queued work is claimed under the old limits, and the roles that could enqueue
or run the daemon still can (the functions whose signature changed carry their grants)."""

from __future__ import annotations

import uuid

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from sql_helpers import claim_or_wait


async def test_upgrade_from_version_2_keeps_work_and_grants(empty_database) -> None:
    flow = next(m.version for m in migrations() if m.name == "flow_control")
    role = f"chunkd_up_{uuid.uuid4().hex[:10]}"
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=flow - 1)
        await conn.execute(f"CREATE ROLE {role}")
        await conn.execute(
            "GRANT EXECUTE ON FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int,"
            " timestamptz, text, boolean, text),"
            f" chunkd.claim_chunks(text, int, text[], float8), chunkd.queue_depth() TO {role}"
        )
        plain = await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1, 2, 3]')")
        ordered = await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1, 2, 3]', '{}', 1)")
        held = await conn.fetch("SELECT * FROM chunkd.claim_chunks('old', 2, NULL, 60)")
        assert sorted((r["sync_job_id"] == ordered, r["seq"]) for r in held) == [
            (False, 0),
            (True, 0),
        ]

        assert (await apply_migrations(conn, up_to=flow)).versions == [flow]

        for function in (
            "create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text,"
            " numeric, text)",
            "claim_or_wait(text, int, text[], float8, float8)",
            "claim_chunks(text, int, text[], float8)",
            "queue_depth()",
        ):
            assert await conn.fetchval(
                "SELECT has_function_privilege($1, $2::regprocedure, 'EXECUTE')",
                role,
                f"chunkd.{function}",
            ), function
        assert not await conn.fetchval(
            "SELECT has_function_privilege($1, 'chunkd.pause_sync_job(uuid)', 'EXECUTE')", role
        ), "new operator functions are granted to no one"
        rows, wait = await claim_or_wait(conn, "new", 10)
        assert wait is None
        assert [(r["sync_job_id"], r["seq"]) for r in rows] == [(plain, 1), (plain, 2)], (
            "max_concurrency 1 still holds while the upgraded claim is in flight"
        )
        # The chunks claimed before the upgrade are still held by their worker and attempt.
        accepted = await conn.fetch(
            "SELECT * FROM chunkd.complete_attempts('old', $1, $2)", [r["id"] for r in held], [1, 1]
        )
        assert len(accepted) == 2
        rows, _ = await claim_or_wait(conn, "new", 10)
        assert [(r["sync_job_id"], r["seq"]) for r in rows] == [(ordered, 1)]
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
