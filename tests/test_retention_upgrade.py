"""A database of a released version with finished work upgrades to retention: its finished jobs
move to the history on the first maintenance rounds and read as before (schema version 1's
outcomes and audit rows included), its unfinished work stays where it was, a retry brings a
moved job back, and the history expires later."""

from __future__ import annotations

import pytest

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from history_helpers import (
    counts_match,
    history_rows,
    job_reads,
    live_rows,
    rounds_until_idle,
    wait_for_round,
)
from sql_helpers import claim, complete
from upgrade_state import build_live_state

FINISHED = ("completed", "partial", "cancelled")
NOTHING = {"jobs": 0, "chunks": 0, "attempts": 0, "events": 0}


@pytest.mark.parametrize("version", [1, 8])
async def test_a_released_database_keeps_its_history_then_expires_it(
    empty_database: str, version: int
) -> None:
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=version)
        jobs = await build_live_state(conn, version)
        await apply_migrations(conn)
        # Short policies, so that the test sees the history expire (partitions of 4 s).
        for state in ("completed", "failed", "cancelled"):
            await conn.execute("SELECT chunkd.set_retention($1, '15 seconds')", state)
        finished = {name: jobs[name] for name in FINISHED}
        unfinished = {name: job for name, job in jobs.items() if name not in FINISHED}
        before = {job: await job_reads(conn, job) for job in finished.values()}
        live_before = {job: await live_rows(conn, job) for job in unfinished.values()}

        assert await rounds_until_idle(conn) == len(finished)
        for name, job in finished.items():
            assert await live_rows(conn, job) == NOTHING, name
            assert (await history_rows(conn, job))["jobs"] == 1, name
            assert await job_reads(conn, job) == before[job], name
        for job in unfinished.values():
            assert await live_rows(conn, job) == live_before[job]
        # Version 1's outcomes of the moved jobs' chunks went with them (into history_chunks).
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM chunkd.legacy_outcomes o"
                " WHERE NOT EXISTS (SELECT 1 FROM chunkd.chunks c WHERE c.id = o.chunk_id)"
            )
            == 0
        )
        v1_rows = await conn.fetchval("SELECT count(*) FROM chunkd.history_events WHERE v1")
        assert await conn.fetchval("SELECT count(*) FROM chunkd.events_v1") == (
            # the unfinished jobs' version 1 audit rows stay
            await conn.fetchval(
                "SELECT count(*) FROM chunkd.events_v1 v JOIN chunkd.jobs j"
                " ON j.public_id = v.sync_job_id"
            )
        )
        assert (v1_rows > 0) == (version == 1)
        await counts_match(conn)

        # The operator's retry brings the failed job back, its audit trail with it.
        partial = finished["partial"]
        assert await conn.fetchval("SELECT chunkd.retry_failed_chunks($1)", partial) == 1
        assert await history_rows(conn, partial) == NOTHING
        events_back = len(before[partial]["chunk_events"])
        assert len((await job_reads(conn, partial))["chunk_events"]) == events_back + 1
        (row,) = await claim(conn, "upgraded", 1, kinds=["partial"])
        assert await complete(conn, row["queue_id"], "upgraded", row["attempt"])
        assert await rounds_until_idle(conn) == 1

        # Then every partition of the history expires and goes; the live work is untouched.
        await wait_for_round(
            conn, "NOT EXISTS (SELECT 1 FROM chunkd.history_partitions)", timeout_s=60
        )
        for job in finished.values():
            assert await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job) is None
            assert await history_rows(conn, job) == NOTHING
        for job in unfinished.values():
            assert await live_rows(conn, job) == live_before[job]
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname ~ '^history_.*_p[0-9]'"
            )
            == 0
        )
        await counts_match(conn)
    finally:
        await conn.close()
