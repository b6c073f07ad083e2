"""Recurring schedules fired by real ``chunkd run`` daemons, with a fake schedule clock (a file
the daemons read, ``--schedule-clock-file``): three daemons fire exactly once per due time
over simulated days with a DST change in Europe/Berlin, one catch-up fire after downtime,
dedupe, pause/resume, and clear errors."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from chunkd.db import DatabaseError
from daemon_helpers import run_chunkd, wait_until

BERLIN = ZoneInfo("Europe/Berlin")
QUARTER = timedelta(minutes=15)


class FakeClock:
    def __init__(self, path: Path, now: datetime) -> None:
        self.path = path
        self.set(now)

    def set(self, now: datetime) -> None:
        self.now = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(now.isoformat())
        tmp.replace(self.path)  # atomic: a daemon never reads half a timestamp


def _daemon_args(clock: FakeClock) -> list[str]:
    return [
        "--handler", "test=daemon_handlers:record",
        "--schedule-interval", "30ms", "--schedule-clock-file", str(clock.path),
    ]  # fmt: skip


async def _create(conn: asyncpg.Connection, name: str, cron: str, **kw: object) -> str:
    return await conn.fetchval(
        "SELECT chunkd.create_schedule($1, $2, $3, $4::jsonb, timezone => $5, dedupe => $6)",
        name, cron, kw.get("kind", "tick"), json.dumps([{"n": 1}]),
        kw.get("timezone", "Europe/Berlin"), kw.get("dedupe", False),
    )  # fmt: skip


async def _settled(conn: asyncpg.Connection, clock: FakeClock) -> bool:
    """Every active schedule is planned and nothing is due at the clock's time any more."""
    return await conn.fetchval(
        "SELECT count(*) = 0 FROM chunkd.schedules WHERE paused_at IS NULL "
        "AND (next_fire_at IS NULL OR next_fire_at <= $1)",
        clock.now,
    )


async def _step_through(conn: asyncpg.Connection, clock: FakeClock, start: datetime, end: datetime):
    """Moves the clock to every quarter hour (UTC) in [start, end), one second past it, and
    waits each time until the daemons have fired everything due."""
    t = start
    while t < end:
        clock.set(t + timedelta(seconds=1))
        await wait_until(lambda: _settled(conn, clock), timeout_s=20, what=f"fires at {t}")
        t += QUARTER


async def _fires(conn: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT f.* FROM chunkd.schedule_fires f JOIN chunkd.schedules s ON s.id = f.schedule_id "
        "WHERE s.name = $1 ORDER BY f.due_at",
        name,
    )


async def _check_day(conn: asyncpg.Connection, prefix: str, day_start: datetime, hours: int):
    """The local day has ``hours`` real hours: a fire per quarter hour and per hour of it,
    each once, each with its own job, and the nightly 02:30 once."""
    quarter = await _fires(conn, f"{prefix}-quarter")
    assert [f["due_at"] for f in quarter] == [day_start + QUARTER * i for i in range(hours * 4)]
    hourly = await _fires(conn, f"{prefix}-hourly")
    assert [f["due_at"] for f in hourly] == [day_start + timedelta(hours=i) for i in range(hours)]
    nightly = await _fires(conn, f"{prefix}-nightly")
    assert len(nightly) == 1
    for fire in [*quarter, *hourly, *nightly]:
        assert fire["sync_job_id"] is not None and not fire["deduped"]
    jobs = [f["sync_job_id"] for f in [*quarter, *hourly, *nightly]]
    assert len(set(jobs)) == len(jobs)
    assert await conn.fetchval(
        "SELECT count(*) FROM chunkd.sync_jobs WHERE id = ANY ($1)", jobs
    ) == len(jobs)  # fmt: skip
    return nightly[0]["due_at"]


async def test_three_daemons_fire_once_per_due_time_across_dst_in_berlin(
    conn, start, tmp_path
) -> None:
    # Spring: 2026-03-29 has 23 hours in Berlin (02:00 CET -> 03:00 CEST).
    spring = datetime(2026, 3, 29, tzinfo=BERLIN).astimezone(UTC)
    clock = FakeClock(tmp_path / "clock", spring - timedelta(seconds=30))
    for cron, name in (("*/15 * * * *", "quarter"), ("0 * * * *", "hourly"),
                       ("30 2 * * *", "nightly")):  # fmt: skip
        assert await _create(conn, f"spring-{name}", cron) == "created"
    for _ in range(3):
        start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedules planned")
    await _step_through(conn, clock, spring, spring + timedelta(hours=23))
    nightly = await _check_day(conn, "spring", spring, 23)
    # 02:30 does not exist that night: it fires once, right after the change (03:00 CEST).
    assert nightly.astimezone(BERLIN).isoformat() == "2026-03-29T03:00:00+02:00"

    # Autumn: 2026-10-25 has 25 hours (03:00 CEST -> 02:00 CET): 02:30 fires once, the
    # quarter-hour schedule fires in both 02:xx hours (distinct instants).
    for name in ("quarter", "hourly", "nightly"):
        await conn.execute("SELECT chunkd.drop_schedule($1)", f"spring-{name}")
    autumn = datetime(2026, 10, 25, tzinfo=BERLIN).astimezone(UTC)
    clock.set(autumn - timedelta(seconds=30))
    for cron, name in (("*/15 * * * *", "quarter"), ("0 * * * *", "hourly"),
                       ("30 2 * * *", "nightly")):  # fmt: skip
        await _create(conn, f"autumn-{name}", cron)
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedules planned")
    await _step_through(conn, clock, autumn, autumn + timedelta(hours=25))
    nightly = await _check_day(conn, "autumn", autumn, 25)
    assert nightly.astimezone(BERLIN).isoformat() == "2026-10-25T02:30:00+02:00"
    # No leader: the due times were fired by whichever daemon got there first.
    firing = await conn.fetchval("SELECT count(DISTINCT worker_id) FROM chunkd.schedule_fires")
    assert firing >= 2


async def test_one_catch_up_fire_after_every_daemon_was_down(conn, start, tmp_path) -> None:
    t0 = datetime(2026, 5, 4, 8, 0, 30, tzinfo=UTC)
    clock = FakeClock(tmp_path / "clock", t0)
    await _create(conn, "every5", "*/5 * * * *", timezone="UTC")
    daemon = start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedule planned")
    assert await daemon.stop() == 0
    # Down for an hour: 12 due times pass with no daemon running.
    clock.set(t0 + timedelta(hours=1))
    daemon = start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the catch-up fire")
    fires = await _fires(conn, "every5")
    assert [f["due_at"] for f in fires] == [datetime(2026, 5, 4, 8, 5, tzinfo=UTC)]
    nxt = await conn.fetchval("SELECT next_fire_at FROM chunkd.schedules WHERE name = 'every5'")
    assert nxt == datetime(2026, 5, 4, 9, 5, tzinfo=UTC)
    fired = await daemon.wait_for_event("schedule.fired")
    assert fired["schedule"] == "every5"


async def test_dedupe_skips_a_due_time_while_the_previous_job_runs(conn, start, tmp_path) -> None:
    t0 = datetime(2026, 5, 4, 8, 0, 30, tzinfo=UTC)
    clock = FakeClock(tmp_path / "clock", t0)
    # kind 'tick' has no handler here: its jobs stay unfinished until cancelled.
    await _create(conn, "sync-all", "* * * * *", timezone="UTC", dedupe=True)
    start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedule planned")
    for minute in (1, 2, 3):
        clock.set(t0 + timedelta(minutes=minute))
        await wait_until(lambda: _settled(conn, clock), timeout_s=20, what=f"minute {minute}")
    first, second, third = await _fires(conn, "sync-all")
    assert not first["deduped"]
    assert second["deduped"] and third["deduped"]
    assert second["sync_job_id"] == third["sync_job_id"] == first["sync_job_id"]
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs WHERE kind = 'tick'") == 1
    await conn.execute("SELECT chunkd.cancel_sync_job($1)", first["sync_job_id"])
    clock.set(t0 + timedelta(minutes=4))
    await wait_until(lambda: _settled(conn, clock), timeout_s=20, what="minute 4")
    fourth = (await _fires(conn, "sync-all"))[-1]
    assert not fourth["deduped"] and fourth["sync_job_id"] != first["sync_job_id"]


async def test_pause_and_resume_without_catch_up(conn, start, tmp_path) -> None:
    t0 = datetime(2026, 5, 4, 8, 0, 30, tzinfo=UTC)
    clock = FakeClock(tmp_path / "clock", t0)
    await _create(conn, "paused", "* * * * *", timezone="UTC")
    start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedule planned")
    await conn.execute("SELECT chunkd.pause_schedule('paused')")
    clock.set(t0 + timedelta(minutes=10))
    await conn.execute("SELECT chunkd.resume_schedule('paused')")
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedule replanned")
    assert await _fires(conn, "paused") == []
    nxt = await conn.fetchval("SELECT next_fire_at FROM chunkd.schedules WHERE name = 'paused'")
    assert nxt == datetime(2026, 5, 4, 8, 11, tzinfo=UTC)


async def test_schedule_errors_are_clear(conn, start, tmp_path) -> None:
    with pytest.raises(DatabaseError, match="is not a cron expression"):
        await _create(conn, "bad", "every day")
    with pytest.raises(DatabaseError, match="is not a time zone name"):
        await _create(conn, "bad", "* * * * *", timezone="Mars/Olympus")
    with pytest.raises(DatabaseError, match="no schedule named 'nope'"):
        await conn.execute("SELECT chunkd.drop_schedule('nope')")
    # The right shape, but no minute 61: the daemon that plans it records why, once.
    await _create(conn, "odd", "61 * * * *", timezone="UTC")
    clock = FakeClock(tmp_path / "clock", datetime(2026, 5, 4, tzinfo=UTC))
    daemon = start(*_daemon_args(clock))
    invalid = await daemon.wait_for_event("schedule.invalid")
    assert invalid["schedule"] == "odd"
    error = await conn.fetchval("SELECT last_error FROM chunkd.schedules WHERE name = 'odd'")
    assert "'61 * * * *' is not a cron expression" in error
    # Replacing the definition plans it again.
    assert await _create(conn, "odd", "1 * * * *", timezone="UTC") == "updated"
    await wait_until(lambda: _settled(conn, clock), timeout_s=30, what="the schedule replanned")
    row = await conn.fetchrow("SELECT next_fire_at, last_error FROM chunkd.schedules")
    assert row["last_error"] is None
    assert row["next_fire_at"] == datetime(2026, 5, 4, 0, 1, tzinfo=UTC)


async def test_a_schedule_the_daemons_cannot_read_leaves_the_scheduler_running(
    conn, database, start
) -> None:
    """Issue #21, K17: the only schedule has a cron of the right shape that cronsim
    cannot read ('61 * * * * *'). It used to be planned at 'infinity', which asyncpg reads as a
    naive datetime.max: the scheduler task crashed on every pass (TypeError). Now the daemon
    says why once and keeps firing on the real clock, and the CLI shows the schedule."""
    await _create(conn, "odd", "61 * * * * *", timezone="UTC")
    daemon = start("--handler", "test=daemon_handlers:record", "--schedule-interval", "100ms")
    invalid = await daemon.wait_for_event("schedule.invalid")
    assert invalid["schedule"] == "odd" and "61 * * * * *" in invalid["error"]
    # The pass that recorded it went on to the timer (the crash came there); the passes after
    # it, on the real clock, plan and fire a good schedule added now.
    await _create(conn, "tick", "* * * * * *", timezone="UTC")  # every second
    await wait_until(
        lambda: conn.fetchval(
            "SELECT count(*) >= 3 FROM chunkd.schedule_fires f "
            "JOIN chunkd.schedules s ON s.id = f.schedule_id WHERE s.name = 'tick'"
        ),
        timeout_s=20,
        what="three fires of the good schedule",
    )
    events = [e["event"] for e in daemon.events()]
    assert "task.crashed" not in events, daemon.log_text()[-3000:]
    assert events.count("schedule.invalid") == 1
    assert daemon.process.poll() is None
    row = await conn.fetchrow(
        "SELECT next_fire_at, last_error FROM chunkd.schedules WHERE name = 'odd'"
    )
    assert row["next_fire_at"] is None
    assert "'61 * * * * *' is not a cron expression" in row["last_error"]

    listed = await asyncio.to_thread(
        run_chunkd, "schedule", "list", "--json", "--dsn", database.dsn
    )
    assert listed.code == 0, listed.stderr
    odd = next(s for s in json.loads(listed.stdout) if s["name"] == "odd")
    assert odd["next_fire_at"] is None and "is not a cron expression" in odd["last_error"]
    table = await asyncio.to_thread(
        run_chunkd, "schedule", "list", "--dsn", database.dsn, env={"COLUMNS": "300"}
    )
    assert table.code == 0 and table.stderr == "", table.stderr
    line = next(s for s in table.stdout.splitlines() if s.lstrip("│ ").startswith("odd "))
    assert "9999" not in line and "is not a cron expression" in line


async def test_a_due_time_a_daemon_cannot_read_is_reported_once(conn, start, tmp_path) -> None:
    """A planned schedule whose cron this daemon cannot read when it comes due (changed by
    hand here; in a fleet, planned by a daemon with a newer cronsim) is logged once per due
    time, not on every pass of the scheduler while the clock moves on."""
    for name in ("odd", "tick"):
        await _create(conn, name, "* * * * *", timezone="UTC")
    start_at = datetime(2026, 5, 4, tzinfo=UTC)
    clock = FakeClock(tmp_path / "clock", start_at)
    daemon = start(*_daemon_args(clock))
    await wait_until(lambda: _settled(conn, clock), timeout_s=20, what="both planned")
    await conn.execute("UPDATE chunkd.schedules SET cron = '61 * * * *' WHERE name = 'odd'")
    for minutes in (1, 2, 3):
        clock.set(start_at + timedelta(minutes=minutes, seconds=1))
        await wait_until(
            lambda m=minutes: conn.fetchval(
                "SELECT count(*) = $1 FROM chunkd.schedule_fires f "
                "JOIN chunkd.schedules s ON s.id = f.schedule_id WHERE s.name = 'tick'",
                m,
            ),
            timeout_s=20,
            what=f"fire {minutes} of the good schedule",
        )
    invalid = [e for e in daemon.events() if e["event"] == "schedule.invalid"]
    assert [e["schedule"] for e in invalid] == ["odd"], invalid
