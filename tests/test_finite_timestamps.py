"""No timestamp chunkd stores is ±infinity (issue #21, K17): asyncpg reads PostgreSQL's
'infinity' as a naive datetime.max, which no real (aware) time can be compared with, and the
JSON documents print it as the string "infinity". Every timestamp column of schema chunkd
refuses both (migrations 12 and 13); a schedule the daemons cannot read is NULL with its error,
not parked at 'infinity'; an upgraded database has its parked schedules moved over."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import pytest

from chunkd.db import DatabaseError, connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from daemon_helpers import run_chunkd

TIME_TYPES = ("timestamptz", "timestamp", "date")


async def test_every_timestamp_column_refuses_infinity(conn) -> None:
    """The rule holds for every table, including any a later migration adds: a time column of
    schema chunkd without its validated check fails here."""
    columns = await conn.fetch(
        "SELECT c.relname AS tbl, a.attname AS col FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'chunkd' AND c.relkind IN ('r', 'p') AND a.attnum > 0"
        "   AND NOT a.attisdropped AND format_type(a.atttypid, NULL) = ANY ($1)"
        " ORDER BY 1, 2",
        [{"timestamptz": "timestamp with time zone", "timestamp": "timestamp without time zone"}
         .get(t, t) for t in TIME_TYPES],
    )  # fmt: skip
    assert len(columns) >= 30, columns  # the audit: every chunkd table's times are here
    checks = {
        (r["tbl"], r["def"])
        for r in await conn.fetch(
            "SELECT c.conrelid::regclass::text AS tbl, pg_get_constraintdef(c.oid) AS def"
            " FROM pg_constraint c WHERE c.connamespace = 'chunkd'::regnamespace"
            "   AND c.contype = 'c' AND c.convalidated"
        )
    }
    missing = [
        f"chunkd.{r['tbl']}.{r['col']}"
        for r in columns
        if (f"chunkd.{r['tbl']}", f"CHECK (isfinite({r['col']}))") not in checks
    ]
    assert missing == []


async def test_a_job_parked_at_infinity_by_hand_is_refused_and_status_keeps_working(
    conn, database
) -> None:
    """Another way in: an operator 'parks' a job with run_at = 'infinity'. `chunkd status`
    failed on it ("Invalid isoformat string: 'infinity'"), the dashboard's job list answered
    503. The write is refused now, naming the column's check."""
    job = await conn.fetchval(
        "SELECT chunkd.create_sync_job('test', '[{}, {}]', run_at => now() + interval '1 hour')"
    )
    await conn.execute("SELECT chunkd.create_schedule('s', '* * * * *', 'k', '[{}]')")
    updates = {
        "jobs_run_at_finite": "UPDATE chunkd.jobs SET run_at = $1::text::timestamptz",
        "scheduled_run_at_finite": "UPDATE chunkd.scheduled SET run_at = $1::text::timestamptz",
        "schedules_next_fire_at_finite": (
            "UPDATE chunkd.schedules SET next_fire_at = $1::text::timestamptz"
        ),
        "chunks_created_at_finite": "UPDATE chunkd.chunks SET created_at = $1::text::timestamptz",
    }
    for check, update in updates.items():
        for value in ("infinity", "-infinity"):
            with pytest.raises(asyncpg.CheckViolationError, match=check):
                await conn.execute(update, value)
    status = await asyncio.to_thread(
        run_chunkd, "status", str(job), "--json", "--dsn", database.dsn
    )
    assert status.code == 0, status.stderr
    assert json.loads(status.stdout)["overall_status"] == "scheduled"


async def test_the_schedule_functions_take_no_sentinel(conn) -> None:
    """A daemon (of any version) that computed a sentinel cannot store it: plan_schedule and
    fire_schedule refuse 'infinity' as a due time."""
    await conn.execute("SELECT chunkd.create_schedule('s', '* * * * *', 'k', '[{}]')")
    sid = await conn.fetchval("SELECT id FROM chunkd.schedules")
    with pytest.raises(asyncpg.CheckViolationError, match="schedules_next_fire_at_finite"):
        await conn.fetchval("SELECT chunkd.plan_schedule($1, 'infinity')", sid)
    due = datetime(2026, 5, 4, 0, 1, tzinfo=UTC)
    assert await conn.fetchval("SELECT chunkd.plan_schedule($1, $2)", sid, due)
    with pytest.raises(asyncpg.CheckViolationError, match="schedules_next_fire_at_finite"):
        await conn.fetch("SELECT * FROM chunkd.fire_schedule($1, $2, 'infinity', 'w')", sid, due)
    # An unreadable cron is recorded as NULL with its reason, once (the second daemon finds
    # it recorded), and is not offered for planning again.
    await conn.execute("SELECT chunkd.create_schedule('odd', '61 * * * *', 'k', '[{}]')")
    odd = await conn.fetchval("SELECT id FROM chunkd.schedules WHERE name = 'odd'")
    assert await conn.fetchval("SELECT chunkd.plan_schedule($1, NULL, 'bad minute')", odd)
    assert not await conn.fetchval("SELECT chunkd.plan_schedule($1, NULL, 'bad minute')", odd)
    row = await conn.fetchrow(
        "SELECT next_fire_at, last_error FROM chunkd.schedules WHERE id = $1", odd
    )
    assert (row["next_fire_at"], row["last_error"]) == (None, "bad minute")
    early = datetime(2026, 5, 4, tzinfo=UTC)  # before s is due: nothing to plan or fire
    assert await conn.fetch("SELECT * FROM chunkd.schedules_due($1)", early) == []
    assert await conn.fetchval("SELECT chunkd.next_schedule_at()") == due
    # Paused and resumed: read again (maybe by a daemon with a newer cronsim).
    await conn.execute("SELECT chunkd.pause_schedule('odd')")
    await conn.execute("SELECT chunkd.resume_schedule('odd')")
    due_now = await conn.fetch("SELECT * FROM chunkd.schedules_due($1)", early)
    assert [r["name"] for r in due_now] == ["odd"]


async def test_upgrade_moves_parked_schedules_and_names_a_hand_set_infinity(
    empty_database,
) -> None:
    """A version 9 database: its plan_schedule parked an unreadable schedule at 'infinity',
    and an operator parked a job the same way. `chunkd migrate` stops at the job's row in one
    line naming the check (nothing of that step applied); once the row holds a real time, it
    completes, and the schedule is NULL with its error kept."""
    finite = next(m.version for m in migrations() if m.name == "finite_timestamps")
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=finite - 1)
        await conn.execute("SELECT chunkd.create_schedule('odd', '61 * * * *', 'k', '[{}]')")
        await conn.execute(
            "SELECT chunkd.plan_schedule(id, NULL, 'bad minute') FROM chunkd.schedules"
        )
        parked = await conn.fetchval("SELECT next_fire_at FROM chunkd.schedules")
        assert parked == datetime.max, "the old definition parks it at 'infinity'"
        job = await conn.fetchval("SELECT chunkd.create_sync_job('k', '[{}]')")
        await conn.execute("UPDATE chunkd.jobs SET run_at = 'infinity' WHERE public_id = $1", job)

        failed = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database)
        assert failed.code != 0
        error = failed.one_error_line()
        assert f"migration {finite + 1} (finite_timestamps_validated) failed" in error
        assert "jobs_run_at_finite" in error and "nothing of it was applied" in error

        await conn.execute("UPDATE chunkd.jobs SET run_at = NULL WHERE public_id = $1", job)
        done = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database)
        assert done.code == 0, done.stderr
        row = await conn.fetchrow("SELECT next_fire_at, last_error FROM chunkd.schedules")
        assert (row["next_fire_at"], row["last_error"]) == (None, "bad minute")
        listed = await asyncio.to_thread(
            run_chunkd, "schedule", "list", "--json", "--dsn", empty_database
        )
        (odd,) = json.loads(listed.stdout)
        assert odd["next_fire_at"] is None and odd["last_error"] == "bad minute"
        with pytest.raises(DatabaseError, match="schedules_next_fire_at_finite"):
            await conn.execute("UPDATE chunkd.schedules SET next_fire_at = 'infinity'")
    finally:
        await conn.close()
