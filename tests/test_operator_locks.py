"""Operator actions never stall the fleet behind an idle transaction (issue 21, K12).

The input: an application session that called ``chunkd.create_sync_job`` in a transaction and
did not commit (it holds ROW EXCLUSIVE on ``chunkd.ready``), then ``chunkd pause JOB``, while a
real daemon claims a stream of another job's chunks and another session enqueues. Before the
fix the pause's SHARE lock waited behind the idle transaction for 10 s, and every claim and
enqueue of the fleet queued behind the pause (an unrelated enqueue took 9.7 s). Now claims keep
flowing, the unrelated enqueue completes at once, and the pause succeeds once the transaction
commits, or gives up after its ``--lock-wait`` with one line naming the session in its way. The
same for the dashboard's actions and ``chunkd migrate``, and for sessions idle after a
REPEATABLE READ read of the queue or holding a job's row.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import asyncpg
import httpx
import pytest

from chunkd.db import connect
from chunkd.db import migrate as migrate_module
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import Migration, migrations
from chunkd.errors import ChunkdError
from daemon_helpers import run_chunkd
from lock_helpers import IDLE_ENQUEUE, Fleet, Holder, cli_backend, hold, start_fleet
from sql_helpers import create_job
from test_security import dsn_as
from web_helpers import csrf_of, serve

# The longest the stream may go without a claim while an action tries for its locks (each try
# waits at most 50 ms; the rest is the daemon's own pace on a loaded 2-core machine).
MAX_CLAIM_GAP_S = 0.2
# How long an unrelated enqueue may take meanwhile.
MAX_ENQUEUE_S = 0.5

PAUSED = "SELECT paused_at IS NOT NULL FROM chunkd.jobs WHERE public_id = $1"


async def _fleet_unharmed(fleet: Fleet, since: Any, action: asyncio.Future[Any]) -> None:
    """While ``action`` tries for its locks: an unrelated enqueue completes at once, and the
    stream has not gone without a claim for long."""
    await asyncio.sleep(0.3)
    assert not action.done(), "the action is still trying"
    enqueue_s = await fleet.timed_enqueue()
    assert enqueue_s < MAX_ENQUEUE_S, f"an unrelated enqueue took {enqueue_s:.3f}s"
    await asyncio.sleep(0.7)
    gap_s = await fleet.longest_gap_s(since, await fleet.now())
    assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"


async def _migrate(dsn: str, lock_wait_s: float) -> Any:
    """``chunkd migrate`` on a session of its own: the fleet's watch connection stays free to
    read while the migration tries for its locks."""
    own = await connect(dsn)
    try:
        return await apply_migrations(own, lock_wait_s=lock_wait_s)
    finally:
        await own.close()


def _names(line: str, holder: Holder, lock: str) -> None:
    """The line names the holder: pid, application, state and for how long, the lock."""
    assert "\n" not in line
    assert f"pid {holder.pid} (role " in line, line
    assert "application 'billing-app', idle in transaction for " in line, line
    assert re.search(r"idle in transaction for \d+\.\d s, transaction open \d+\.\d s\)", line)
    assert f"holds {lock}" in line, line
    assert "nothing was changed" in line and f"pg_terminate_backend({holder.pid})" in line


def _pause_cli(dsn: str, job: Any, lock_wait: str = "10s") -> Awaitable[Any]:
    return asyncio.to_thread(run_chunkd, "pause", str(job), "--dsn", dsn, "--lock-wait", lock_wait)


async def test_pause_behind_an_idle_enqueue_leaves_the_fleet_alone_and_succeeds_on_commit(
    database, conn, start
) -> None:
    fleet = await start_fleet(database.dsn, conn, start)
    job = await create_job(conn, 5, kind="mail")
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        since = await fleet.now()
        pause = asyncio.ensure_future(_pause_cli(database.dsn, job))
        await cli_backend(conn)
        await _fleet_unharmed(fleet, since, pause)
        assert not await conn.fetchval(PAUSED, job)
        await holder.commit()
        result = await asyncio.wait_for(pause, 30)
        assert result.code == 0, result.stderr
        assert result.stdout.startswith(f"paused job {job}: 5 pending chunks held")
        assert await conn.fetchval(PAUSED, job)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
    finally:
        await holder.close()


async def test_pause_gives_up_after_its_lock_wait_naming_the_idle_session(
    database, conn, start
) -> None:
    fleet = await start_fleet(database.dsn, conn, start)
    job = await create_job(conn, 5, kind="mail")
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        since = await fleet.now()
        pause = asyncio.ensure_future(_pause_cli(database.dsn, job, "2s"))
        await cli_backend(conn)
        await _fleet_unharmed(fleet, since, pause)
        result = await asyncio.wait_for(pause, 30)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
        assert result.code == 2, result.stdout
        line = result.one_error_line()
        assert line.startswith(f"pause of job {job} waited 2 s for locks other sessions hold")
        _names(line, holder, "RowExclusiveLock on chunkd.ready")
        assert not await conn.fetchval(PAUSED, job), "nothing was changed"
    finally:
        await holder.close()


async def test_pause_of_a_job_whose_row_a_session_holds_names_it_and_the_fleet_runs_on(
    database, conn, start
) -> None:
    """The pause locks the job's row before the ready queue: a session holding the row (here
    an operator's retry left in an open transaction) keeps the pause waiting, never the fleet."""
    fleet = await start_fleet(database.dsn, conn, start)
    job = await create_job(conn, 5, kind="mail")
    holder = await hold(database.dsn, "SELECT chunkd.retry_failed_chunks($1)", job)
    try:
        since = await fleet.now()
        pause = asyncio.ensure_future(_pause_cli(database.dsn, job, "2s"))
        await cli_backend(conn)
        await _fleet_unharmed(fleet, since, pause)
        result = await asyncio.wait_for(pause, 30)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
        assert result.code == 2, result.stdout
        _names(result.one_error_line(), holder, "RowShareLock on chunkd.jobs")
        assert not await conn.fetchval(PAUSED, job)
    finally:
        await holder.close()


def _plant(monkeypatch: pytest.MonkeyPatch, name: str, sql: str) -> Migration:
    planted = Migration(migrations()[-1].version + 1, name, sql)
    monkeypatch.setattr(migrate_module, "migrations", lambda: (*migrations(), planted))
    return planted


async def test_a_repeatable_read_reader_does_not_hold_a_pause_and_migrate_names_it(
    database, conn, start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ACCESS SHARE (a REPEATABLE READ read of the queue, idle since) does not conflict with the
    pause's SHARE; it does with a migration's ACCESS EXCLUSIVE, which must not queue the fleet
    behind it either."""
    fleet = await start_fleet(database.dsn, conn, start)
    job = await create_job(conn, 5, kind="mail")
    holder = await hold(
        database.dsn, "SELECT count(*) FROM chunkd.ready", isolation="repeatable_read"
    )
    try:
        result = await asyncio.wait_for(_pause_cli(database.dsn, job, "2s"), 30)
        assert result.code == 0, result.stderr

        planted = _plant(
            monkeypatch, "ready_probe", "ALTER TABLE chunkd.ready ADD COLUMN probe int;"
        )
        since = await fleet.now()
        migrate = asyncio.ensure_future(_migrate(database.dsn, 2))
        await _fleet_unharmed(fleet, since, migrate)
        with pytest.raises(ChunkdError) as gave_up:
            await asyncio.wait_for(migrate, 30)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
        line = str(gave_up.value)
        assert line.startswith(f"migration {planted.version} (ready_probe) waited 2 s for locks")
        _names(line, holder, "AccessShareLock on chunkd.ready")
        probe = "SELECT count(*) FROM pg_attribute WHERE attrelid = 'chunkd.ready'::regclass"
        columns = await conn.fetchval(probe + " AND attname = 'probe'")
        assert columns == 0, "nothing of it was applied"

        await holder.commit()
        assert (await apply_migrations(conn, lock_wait_s=2)).versions == [planted.version]
    finally:
        await holder.close()


async def test_migrate_behind_an_idle_enqueue_names_it_then_applies_once_it_commits(
    database, conn, start, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = await start_fleet(database.dsn, conn, start)
    planted = _plant(
        monkeypatch, "ready_by_kind", "CREATE INDEX ready_probe ON chunkd.ready (kind);"
    )
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        since = await fleet.now()
        migrate = asyncio.ensure_future(_migrate(database.dsn, 2))
        await _fleet_unharmed(fleet, since, migrate)
        with pytest.raises(ChunkdError) as gave_up:
            await asyncio.wait_for(migrate, 30)
        _names(str(gave_up.value), holder, "RowExclusiveLock on chunkd.")
        assert await conn.fetchval("SELECT to_regclass('chunkd.ready_probe')") is None

        since = await fleet.now()
        migrate = asyncio.ensure_future(_migrate(database.dsn, 10))
        await _fleet_unharmed(fleet, since, migrate)
        await holder.commit()
        assert (await asyncio.wait_for(migrate, 30)).versions == [planted.version]
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
    finally:
        await holder.close()


async def test_the_definitions_step_replacing_a_trigger_waits_politely(
    database, conn, start
) -> None:
    """CREATE OR REPLACE TRIGGER on the ready queue takes SHARE ROW EXCLUSIVE: the definitions
    transaction meets the idle enqueue without holding the fleet up, and goes through once the
    enqueue commits."""
    fleet = await start_fleet(database.dsn, conn, start)
    await conn.execute(
        "UPDATE chunkd.schema_definitions SET checksum = 'changed'"
        " WHERE path = 'triggers/notify.sql'"
    )
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        since = await fleet.now()
        migrate = asyncio.ensure_future(_migrate(database.dsn, 10))
        await _fleet_unharmed(fleet, since, migrate)
        await holder.commit()
        migrated = await asyncio.wait_for(migrate, 30)
        assert migrated.definitions == ("triggers/notify.sql",)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
    finally:
        await holder.close()


async def test_a_dashboard_pause_behind_an_idle_enqueue(database, conn, start) -> None:
    fleet = await start_fleet(database.dsn, conn, start)
    job = await create_job(conn, 5, kind="mail")
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        async with (
            serve(database.dsn, lock_wait_s=1.5) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            csrf = csrf_of((await http.get(f"/jobs/{job}/pause")).text)
            since = await fleet.now()
            post = asyncio.ensure_future(http.post(f"/jobs/{job}/pause", data={"csrf": csrf}))
            await _fleet_unharmed(fleet, since, post)
            refused = await asyncio.wait_for(post, 30)
            assert refused.status_code == 503
            (line,) = re.findall(
                r'<p class="error" role="alert">(.*?)</p>', refused.text, re.DOTALL
            )
            _names(line.replace("&#39;", "'"), holder, "RowExclusiveLock on chunkd.ready")
            assert not await conn.fetchval(PAUSED, job)

            since = await fleet.now()
            post = asyncio.ensure_future(http.post(f"/jobs/{job}/pause", data={"csrf": csrf}))
            await asyncio.sleep(0.5)
            assert not post.done()
            await holder.commit()
            done = await asyncio.wait_for(post, 30)
            assert done.status_code == 303, done.text
            assert await conn.fetchval(PAUSED, job)
            gap_s = await fleet.longest_gap_s(since, await fleet.now())
            assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
    finally:
        await holder.close()


async def test_a_role_that_may_not_see_the_session_is_told_so_never_shown_its_query(
    database, conn
) -> None:
    """The flow-control role of docs/security.md, blocked by another role's idle session:
    pg_stat_activity hides that session's state from it, and the line says so (and what
    grant shows it); the session's query text is never shown."""
    role = f"chunkd_flow_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {role}")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.pause_sync_job(uuid) TO {role}")
    job = await create_job(conn, 2, kind="mail")
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        result = await asyncio.wait_for(_pause_cli(dsn_as(database.dsn, role), job, "1s"), 30)
        line = result.one_error_line()
        assert (
            f"pid {holder.pid} (role postgres, application 'billing-app', its state is hidden "
            f"from role {role}: grant it pg_read_all_stats to see it) holds RowExclusiveLock on "
            "chunkd.ready"
        ) in line, line
        assert "invoice" not in line and "create_sync_job" not in line

        await conn.execute(f"GRANT pg_read_all_stats TO {role}")
        result = await asyncio.wait_for(_pause_cli(dsn_as(database.dsn, role), job, "1s"), 30)
        _names(result.one_error_line(), holder, "RowExclusiveLock on chunkd.ready")
    finally:
        await holder.close()
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_called_in_sql_a_pause_retries_for_chunkd_lock_wait_then_fails_cleanly(
    database, conn
) -> None:
    """Without the CLI: pause_sync_job keeps its own bounded loop (each try 50 ms) for the
    setting chunkd.lock_wait, then raises SQLSTATE 55P03 with nothing changed."""
    job = await create_job(conn, 2, kind="mail")
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    pauser = await connect(database.dsn)
    try:
        await pauser.execute("SET chunkd.lock_wait = '0.5'")
        started = time.monotonic()
        with pytest.raises(asyncpg.LockNotAvailableError) as gave_up:
            await pauser.fetchval("SELECT chunkd.pause_sync_job($1)", job)
        assert 0.5 <= time.monotonic() - started < 3
        assert gave_up.value.message == (
            f"chunkd: pause of job {job} waited 0.5 s for locks other transactions hold; "
            "nothing was changed"
        )
        assert not await conn.fetchval(PAUSED, job)
        await pauser.execute("SET chunkd.lock_wait = 'soon'")
        with pytest.raises(asyncpg.InvalidParameterValueError, match=r"chunkd\.lock_wait must be"):
            await pauser.fetchval("SELECT chunkd.pause_sync_job($1)", job)
        await pauser.execute("RESET chunkd.lock_wait")
        await holder.commit()
        assert await pauser.fetchval("SELECT chunkd.pause_sync_job($1)", job) == 2
    finally:
        await pauser.close()
        await holder.close()


async def test_pause_of_a_kind_whose_row_a_session_holds_names_it_and_the_fleet_runs_on(
    database, conn, start
) -> None:
    """A kind's pause takes the ready queue first, then the kind's row without waiting for it:
    a session holding the row (a rate change left in an open transaction) costs the fleet no
    more than a pause's try."""
    fleet = await start_fleet(database.dsn, conn, start)
    await create_job(conn, 5, kind="mail")
    holder = await hold(database.dsn, "SELECT chunkd.set_rate_limit('mail', 5)")
    try:
        since = await fleet.now()
        pause = asyncio.ensure_future(
            asyncio.to_thread(
                run_chunkd, "pause", "--kind", "mail", "--dsn", database.dsn, "--lock-wait", "2s"
            )
        )
        await cli_backend(conn)
        await _fleet_unharmed(fleet, since, pause)
        result = await asyncio.wait_for(pause, 30)
        gap_s = await fleet.longest_gap_s(since, await fleet.now())
        assert gap_s < MAX_CLAIM_GAP_S, f"the stream went {gap_s:.3f}s without a claim"
        _names(result.one_error_line(), holder, "RowExclusiveLock on chunkd.kind_flow")
        assert not await conn.fetchval("SELECT count(*) FROM chunkd.kind_flow")
    finally:
        await holder.close()


async def test_a_rate_limited_kind_under_claims_is_paused_at_once_and_nothing_claimed_after(
    database, conn, start
) -> None:
    """Claims of a rate-limited kind lock the ready queue, then the kind's row: the kind's
    pause, which takes them in the same order, is not starved by them."""
    await conn.execute("SELECT chunkd.set_rate_limit('stream', 200)")
    fleet = await start_fleet(database.dsn, conn, start)
    result = await asyncio.wait_for(
        asyncio.to_thread(
            run_chunkd, "pause", "--kind", "stream", "--dsn", database.dsn, "--lock-wait", "5s"
        ),
        30,
    )
    assert result.code == 0, result.stderr
    paused_at = await conn.fetchval("SELECT at FROM chunkd.events WHERE event = 'paused'")
    await asyncio.sleep(0.5)
    last = await conn.fetchval(
        "SELECT max(a.claimed_at) FROM chunkd.attempts a WHERE a.job_id ="
        " (SELECT id FROM chunkd.jobs WHERE public_id = $1)",
        fleet.job,
    )
    assert last < paused_at, "nothing of the kind is claimed once the pause committed"


async def _slow_claimers(dsn: str, n: int, hold_s: float, stop: asyncio.Event) -> list[int]:
    """``n`` sessions claiming one chunk at a time in transactions that last ``hold_s`` (a slow
    claim, or a claimer far from the database), staggered: ROW EXCLUSIVE on the ready queue is
    never free for long. Returns how many claims each made."""

    async def claimer(i: int) -> int:
        session = await connect(dsn)
        claims = 0
        try:
            await asyncio.sleep(i * hold_s / n)
            while not stop.is_set():
                async with session.transaction():
                    await session.fetch(
                        "SELECT * FROM chunkd.claim_or_wait($1, 1, '{stream}', 60)", f"slow-{i}"
                    )
                    await asyncio.sleep(hold_s * random.uniform(0.7, 1.3))
                claims += 1
        finally:
            await session.close()
        return claims

    return await asyncio.gather(*(claimer(i) for i in range(n)))


async def test_a_busy_fleet_of_slow_claims_does_not_starve_a_pause_or_a_migration(
    database, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims that each hold the ready queue for about 150 ms, six at a time: a 50 ms try
    (almost) never finds it free, and with 50 ms tries only the pause failed after 10 s.
    Since those in the way come and go (none stays, unlike an idle session), the tries wait
    longer, up to 200 ms, and get in (1.0 to 1.5 s here)."""
    await conn.fetchval(
        "SELECT chunkd.create_sync_job('stream', $1::jsonb)", json.dumps([{}] * 5000)
    )
    job = await create_job(conn, 3, kind="mail")
    planted = _plant(
        monkeypatch, "ready_by_kind", "CREATE INDEX ready_probe ON chunkd.ready (kind);"
    )
    stop = asyncio.Event()
    claimers = asyncio.ensure_future(_slow_claimers(database.dsn, 6, 0.15, stop))
    try:
        await asyncio.sleep(0.5)
        await conn.execute("SET chunkd.lock_wait = 5")
        started = time.monotonic()
        assert await conn.fetchval("SELECT chunkd.pause_sync_job($1)", job) == 3
        pause_s = time.monotonic() - started
        started = time.monotonic()
        assert (await apply_migrations(conn, lock_wait_s=5)).versions == [planted.version]
        migrate_s = time.monotonic() - started
    finally:
        stop.set()
        claims = await claimers
    assert min(claims) >= 2, "the claimers kept claiming"
    assert pause_s < 5 and migrate_s < 5, (pause_s, migrate_s)


async def test_pausing_the_busy_job_itself_claims_go_on_until_it_takes_effect_none_after(
    database, conn, start
) -> None:
    """The job under pause is the one being claimed: between the pause's tries its chunks are
    still claimed; once the pause commits, none is. The job's paused_at and its `paused` audit
    row say when it took effect (after the last claim), not when the pause began to try."""
    fleet = await start_fleet(database.dsn, conn, start)
    holder = await hold(database.dsn, IDLE_ENQUEUE)
    try:
        pause = asyncio.ensure_future(_pause_cli(database.dsn, fleet.job))
        await cli_backend(conn)
        await asyncio.sleep(1.0)
        await holder.commit()
        result = await asyncio.wait_for(pause, 30)
        assert result.code == 0, result.stderr
    finally:
        await holder.close()
    await asyncio.sleep(0.5)
    row = await conn.fetchrow(
        "SELECT j.paused_at, (SELECT e.at FROM chunkd.events e WHERE e.job_id = j.id"
        " AND e.event = 'paused') AS event_at, (SELECT max(a.claimed_at) FROM chunkd.attempts a"
        " WHERE a.job_id = j.id) AS last_claim, (SELECT count(*) FROM chunkd.attempts a"
        " WHERE a.job_id = j.id AND a.claimed_at > now() - interval '10 seconds') AS recent"
        " FROM chunkd.jobs j WHERE j.public_id = $1",
        fleet.job,
    )
    assert row["recent"] > 20, "the stream was claimed while the pause tried"
    assert row["last_claim"] < row["paused_at"] <= row["event_at"], dict(row)
