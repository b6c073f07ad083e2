"""Every timestamp chunkd stores is one Python's datetime holds: from 0001-01-01 to before
10000-01-01 UTC (issue #21, K17 and F2). asyncpg reads PostgreSQL's 'infinity' as a naive
datetime.max, which no real (aware) time can be compared with, and the JSON documents print it
as the string "infinity"; a finite time past 9999 (`run_at => '10000-01-01'`, accepted before)
made `chunkd status` fail with an OverflowError traceback, `chunkd status JOB` with "Invalid
isoformat string" and the dashboard with 500s. Every timestamp column of schema chunkd refuses
both (migrations 12 and 13), every way in refuses them in one line, and the readers read the
first and last times in any time zone; a schedule the daemons cannot read is NULL with its
error, not parked at 'infinity'; an upgraded database has its parked schedules moved over."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import httpx
import pytest

import chunkd
from chunkd.cron import next_fire
from chunkd.db import DatabaseError, connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from daemon_helpers import run_chunkd
from web_helpers import serve

TIME_TYPES = ("timestamptz", "timestamp", "date")


async def test_every_timestamp_column_refuses_times_python_cannot_hold(conn) -> None:
    """The rule holds for every table, including any a later migration adds: a time column of
    schema chunkd without its validated check fails here."""
    await conn.execute("SET TimeZone = 'UTC'")  # the check's bounds print in the session's zone
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
        if (f"chunkd.{r['tbl']}", _range_check(r["col"])) not in checks
    ]
    assert missing == []


def _range_check(column: str) -> str:
    return (
        f"CHECK ((({column} >= '0001-01-01 00:00:00+00'::timestamp with time zone)"
        f" AND ({column} < '10000-01-01 00:00:00+00'::timestamp with time zone)))"
    )


# PostgreSQL takes them; Python's datetime holds neither (1 µs out at either end).
BEYOND = ("infinity", "-infinity", "10000-01-01 00:00:00+00", "0001-12-31 23:59:59.999999+00 BC")
# The first and last times chunkd stores.
ENDS = ("0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00")
RUN_AT_REFUSED = (
    "chunkd: run_at must be a finite timestamp from 0001-01-01 to 9999-12-31 UTC (NULL: at once)"
)


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
        for value in BEYOND:
            with pytest.raises(asyncpg.CheckViolationError, match=check):
                await conn.execute(update, value)
        for value in ENDS:  # stored (the last one stays: status reads it below)
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
    for beyond in BEYOND:
        with pytest.raises(asyncpg.CheckViolationError, match="schedules_next_fire_at_finite"):
            await conn.fetchval(
                "SELECT chunkd.plan_schedule($1, $2::text::timestamptz)", sid, beyond
            )
    due = datetime(2026, 5, 4, 0, 1, tzinfo=UTC)
    assert await conn.fetchval("SELECT chunkd.plan_schedule($1, $2)", sid, due)
    for beyond in BEYOND[::2]:  # the later ones (an earlier one is refused as before due_at)
        with pytest.raises(asyncpg.CheckViolationError, match="schedules_next_fire_at_finite"):
            await conn.fetch(
                "SELECT * FROM chunkd.fire_schedule($1, $2, $3::text::timestamptz, 'w')",
                sid,
                due,
                beyond,
            )
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


async def test_every_way_in_refuses_a_time_python_cannot_hold_in_one_line(conn, database) -> None:
    """SQL's create_sync_job and create_sync_jobs, the Python client, `chunkd enqueue --at` and
    `--in`: a time past 9999 or before year 1 in UTC is refused with the line that refuses
    'infinity', and nothing is written. Before, `run_at => '10000-01-01'` was stored."""
    for value in BEYOND:
        with pytest.raises(asyncpg.InvalidParameterValueError) as refused:
            await conn.fetchval(
                "SELECT chunkd.create_sync_job('k', '[1]', run_at => $1::text::timestamptz)", value
            )
        assert str(refused.value).startswith(f"{RUN_AT_REFUSED}, got "), value
        with pytest.raises(asyncpg.InvalidParameterValueError) as refused:
            await conn.fetchval(
                "SELECT chunkd.create_sync_jobs(jsonb_build_array("
                " jsonb_build_object('kind', 'k', 'chunks', '[1]'::jsonb),"
                " jsonb_build_object('kind', 'k', 'chunks', '[1]'::jsonb, 'run_at', $1::text)))",
                value,
            )
        assert str(refused.value).startswith(RUN_AT_REFUSED.replace("run_at", "jobs[1]: run_at")), (
            value
        )
    # Aware datetimes whose UTC time Python cannot hold (asyncpg failed to encode the first).
    for at in (
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
        datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))),
    ):
        with pytest.raises(chunkd.InvalidInputError) as bad:
            await chunkd.create_sync_job(conn, "k", [1], run_at=at)
        assert str(bad.value) == (
            "run_at must be a finite timestamp from 0001-01-01 to 9999-12-31 UTC (None: at once),"
            f" got {at.isoformat()}"
        )
        with pytest.raises(chunkd.InvalidInputError, match=r"^jobs\[0\]\.run_at must be a finite"):
            await chunkd.create_sync_jobs(conn, [{"kind": "k", "chunks": [1], "run_at": at}])
        cli = await asyncio.to_thread(
            run_chunkd, "enqueue", "--kind", "k", "--at", at.isoformat(), "--dsn", database.dsn,
            "-", stdin=b"[1]",
        )  # fmt: skip
        assert cli.code == 2
        assert f"{at.isoformat()!r} is not a time chunkd stores: give one from 0001-01-01 to" in (
            cli.stderr
        )
        assert "Traceback" not in cli.stderr
    later = await asyncio.to_thread(
        run_chunkd, "enqueue", "--kind", "k", "--in", "3000000d", "--dsn", database.dsn, "-",
        stdin=b"[1]",
    )  # fmt: skip
    assert later.one_error_line().startswith(RUN_AT_REFUSED.removeprefix("chunkd: ")), later.stderr
    assert await conn.fetchval("SELECT count(*) FROM chunkd.jobs") == 0
    for end in ENDS:
        job = await conn.fetchval(
            "SELECT chunkd.create_sync_job('k', '[1]', run_at => $1::text::timestamptz)", end
        )
        stored = await conn.fetchval("SELECT run_at FROM chunkd.sync_jobs WHERE id = $1", job)
        assert stored in (datetime(1, 1, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


async def test_the_first_and_last_times_read_back_everywhere_in_any_time_zone(
    conn, database
) -> None:
    """Jobs due at the first and the last time chunkd stores: `chunkd status` (all, one, JSON),
    the client's progress and the dashboard's pages and API read them, with the database
    session and the CLI's host in zones where those times fall outside Python's range in local
    time (Berlin: 10000-01-01 00:59; New York: 1 BC). The progress document printed them in
    the session's zone ("10000-01-01T00:59:59.999999+01:00")."""
    jobs = [
        await conn.fetchval(
            "SELECT chunkd.create_sync_job('k', '[1]', run_at => $1::text::timestamptz)", end
        )
        for end in ENDS
    ]
    expected = {
        jobs[0]: datetime(1, 1, 1, tzinfo=UTC),
        jobs[1]: datetime.max.replace(tzinfo=UTC),
    }
    for zone in ("Europe/Berlin", "America/New_York"):
        await conn.execute(f"ALTER DATABASE \"{database.name}\" SET TimeZone = '{zone}'")
        listed = await asyncio.to_thread(
            run_chunkd, "status", "--dsn", database.dsn, env={"TZ": zone}
        )
        assert listed.code == 0 and not listed.stderr, listed.stderr
        reader = await connect(database.dsn)
        try:
            for job, run_at in expected.items():
                for extra in ((), ("--json",)):
                    one = await asyncio.to_thread(
                        run_chunkd, "status", str(job), *extra, "--dsn", database.dsn,
                        env={"TZ": zone},
                    )  # fmt: skip
                    assert one.code == 0 and not one.stderr, (zone, job, one.stderr)
                document = json.loads(
                    await reader.fetchval("SELECT chunkd.get_sync_job_progress($1)::text", job)
                )
                assert datetime.fromisoformat(document["run_at"]) == run_at
                assert (await chunkd.get_progress(reader, job)).run_at == run_at
        finally:
            await reader.close()
        async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
            for path in ("/jobs", "/queue", *(f"/jobs/{j}" for j in jobs)):
                assert (await http.get(path)).status_code == 200, (zone, path)
            for job, run_at in expected.items():
                answer = await http.get(f"/api/jobs/{job}")
                assert answer.status_code == 200, (zone, job)
                assert datetime.fromisoformat(answer.json()["run_at"]) == run_at


async def test_a_retry_due_past_9999_is_a_data_error_not_a_stored_time(conn) -> None:
    """A failure retried in 3e11 s (9,500 years): refused as a data error (SQLSTATE 22008),
    which the daemon answers by sending the failure again with the default backoff."""
    await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1]')")
    (row,) = await conn.fetch("SELECT * FROM chunkd.claim_next_chunk_job_safe('w', 1)")
    with pytest.raises(asyncpg.DatetimeFieldOverflowError) as refused:
        await conn.fetchval(
            "SELECT chunkd.fail_chunk_job_safe($1, 'w', 1, 'later', true,"
            " interval '300000000000 seconds')",
            row["queue_id"],
        )
    assert str(refused.value).startswith("chunkd: a retry in 300000000000 seconds would be due ")
    assert str(refused.value).endswith(", after 9999-12-31 UTC, the last time chunkd stores")


async def test_a_rate_of_a_chunk_per_millennium_hands_out_turns_chunkd_can_store(conn) -> None:
    """A claimer throttled by the slowest rate is given a turn at most 100 years ahead: the
    turn is stored (wake_at), and 9,500 years ahead was refused by its check, failing every
    claim of the kind."""
    await conn.execute("SELECT chunkd.set_rate_limit('k', 1e-12, 1)")
    await conn.fetchval("SELECT chunkd.create_sync_job('k', '[1, 2]')")
    for expected in (1, 0):
        rows = await conn.fetch("SELECT * FROM chunkd.claim_batch('w', 2, '{k}', 60, NULL, 2)")
        assert len([r for r in rows if r["id"] is not None]) == expected
    wait_s = next(r["wait_s"] for r in rows if r["id"] is None)
    assert 99 * 365 * 86400 < wait_s <= 100 * 366 * 86400
    wake = await conn.fetchval("SELECT wake_at FROM chunkd.kind_flow WHERE kind = 'k'")
    assert wake.year < 2200


async def test_run_refuses_a_lease_or_retry_cap_that_would_store_a_time_past_9999(database) -> None:
    for option in ("--lease", "--retry-cap"):
        refused = await asyncio.to_thread(
            run_chunkd, "run", "--dsn", database.dsn, "--handler", "k=bad_handlers:echo",
            option, "400d",
        )  # fmt: skip
        assert refused.code != 0
        assert refused.one_error_line() == f"{option} must be at most 365d"


def test_a_cron_that_would_fire_after_9999_never_fires() -> None:
    """The scheduler records the reason (next_fire_at NULL) instead of crashing on an
    OverflowError, whatever the schedule's zone."""
    end = datetime(9999, 12, 31, 12, tzinfo=UTC)
    for zone in ("UTC", "Etc/GMT+12", "Pacific/Kiritimati"):
        with pytest.raises(ValueError, match=r"^'0 0 1 1 \*' never fires before 10000-01-01$"):
            next_fire("0 0 1 1 *", zone, end)
