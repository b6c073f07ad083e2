"""A rolling upgrade: a daemon of the previous release (0.2.0, taken from this repository's
history) keeps working while this release's ``chunkd migrate`` applies its migrations and
definitions; a migration that would drop what such a daemon calls is refused while it runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db import migrate as migrate_module
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import Migration, definitions, migrations
from chunkd.errors import ChunkdError
from daemon_handlers import EXECUTIONS_DDL
from daemon_helpers import TESTS_DIR, Daemon, run_chunkd, wait_until
from resources import missing

ROOT = Path(__file__).resolve().parents[1]
# The last commit of release 0.2.0 (schema version 8).
PREVIOUS_RELEASE = "415dfcf87de7011b402f54eb90c261813f32f13d"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The previous release's package and SQL, extracted with ``git archive``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        missing("git and this repository's history are needed to run the previous release")
    target = tmp_path_factory.mktemp("chunkd-0.2.0")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_RELEASE, "daemon", "sql"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        missing(f"commit {PREVIOUS_RELEASE[:12]} (release 0.2.0) is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    yield target


def _old_env(release: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(release / "daemon"), str(TESTS_DIR)])}


async def _done(conn, job) -> bool:
    row = await conn.fetchrow(
        "SELECT overall_status, completed_chunks FROM chunkd.chunk_processing_status"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    return row is not None and row["overall_status"] == "completed"


def test_the_previous_release_is_what_runs(previous_release: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-c", "import chunkd; print(chunkd.__version__, chunkd.__file__)"],
        env={**os.environ, **_old_env(previous_release)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert version[0] == "0.2.0" and version[1].startswith(str(previous_release)), version


async def test_a_previous_release_daemon_keeps_working_through_chunkd_migrate(
    empty_database: str, previous_release: Path, tmp_path: Path
) -> None:
    old_env = _old_env(previous_release)
    installed = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database, env=old_env)
    assert installed.code == 0, installed.stderr
    assert installed.stdout.strip() == "applied migration(s) 1, 2, 3, 4, 5, 6, 7, 8"

    conn = await connect(empty_database)
    daemon = None
    try:
        await conn.execute(EXECUTIONS_DDL)
        chunks = [{"sleep_s": 0.05, "fail_until": 1 if i % 10 == 0 else 0} for i in range(400)]
        job = await conn.fetchval(
            "SELECT chunkd.create_sync_job('rolling', $1::jsonb, '{}', NULL, 3)", json.dumps(chunks)
        )
        daemon = Daemon(
            empty_database, tmp_path / "old.log",
            "--handler", "rolling=daemon_handlers:record", "--concurrency", "4",
            "--retry-base", "50ms", "--retry-cap", "100ms",
            env=old_env,
        )  # fmt: skip
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) >= 30 FROM public.test_executions"),
            timeout_s=30,
            what="the old daemon to run chunks",
        )

        upgraded = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database)
        assert upgraded.code == 0, upgraded.stderr
        latest = migrations()[-1].version
        assert f"applied migration(s) {', '.join(map(str, range(9, latest + 1)))}" in (
            upgraded.stdout
        )
        assert "applied the current definitions" in upgraded.stdout
        assert not await _done(conn, job), "the upgrade ran while the job was under way"

        await wait_until(lambda: _done(conn, job), timeout_s=60, what="the job to finish")
        assert daemon.process.poll() is None, "the old daemon is still running"
        runs = await conn.fetch(
            "SELECT seq, count(*) AS n, max(attempt) AS last FROM public.test_executions"
            " GROUP BY seq ORDER BY seq"
        )
        assert len(runs) == 400
        assert all(r["n"] == (2 if r["seq"] % 10 == 0 else 1) for r in runs), "each chunk once"
        assert await daemon.stop() == 0
        errors = [e for e in daemon.events() if e.get("level") in ("error", "critical")]
        assert errors == [], errors
    finally:
        if daemon is not None:
            daemon.kill()
        await conn.close()


async def test_a_previous_release_daemon_restarted_after_the_upgrade_exits_2(
    empty_database: str, previous_release: Path
) -> None:
    """docs/migrations.md: an old daemon keeps running through the upgrade, but one that
    starts (or restarts) on the upgraded schema refuses it with exit 2, which the systemd
    units do not restart (RestartPreventExitStatus=2, tests/test_systemd_units.py): upgrade the
    package first."""
    upgraded = await asyncio.to_thread(run_chunkd, "migrate", "--dsn", empty_database)
    assert upgraded.code == 0, upgraded.stderr
    latest = migrations()[-1].version
    old = await asyncio.to_thread(
        run_chunkd, "run", "--dsn", empty_database, "--handler", "rolling=daemon_handlers:record",
        env=_old_env(previous_release),
    )  # fmt: skip
    assert old.code == 2, old.stderr
    assert old.stderr.strip() == (
        f"chunkd: error: database schema has version(s) {list(range(9, latest + 1))} that this "
        "chunkd does not know (it knows up to 8): upgrade chunkd"
    )


async def test_migrate_refuses_to_drop_what_a_running_older_daemon_calls(
    database, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    await conn.execute(
        "INSERT INTO chunkd.workers (worker_id, host, pid, version, kinds, concurrency)"
        " VALUES ('old-host:7:abc', 'old-host', 7, '0.2.0', '{k}', 4)"
    )
    # A later release's migration that removes a function 0.2's daemon calls.
    planted = Migration(
        migrations()[-1].version + 1,
        "drop_next_schedule_at",
        "DROP FUNCTION chunkd.next_schedule_at();",
    )
    monkeypatch.setattr(migrate_module, "migrations", lambda: (*migrations(), planted))
    with pytest.raises(ChunkdError) as refused:
        await apply_migrations(conn)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"migration {planted.version} (drop_next_schedule_at) drops chunkd.next_schedule_at(),"
        " which running daemons of chunkd 0.2.0 call: stop them first (old-host:7:abc), then run"
        " chunkd migrate again (a daemon killed without stopping counts as running for "
    ) and message.endswith("); nothing of it was applied")
    assert await conn.fetchval("SELECT to_regprocedure('chunkd.next_schedule_at()')"), "rolled back"
    # Once that daemon is gone (its heartbeat old), the same migration goes through.
    await conn.execute("UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '1 hour'")
    assert (await apply_migrations(conn)).versions == [planted.version]


async def test_migrate_gets_its_locks_while_old_daemons_claim_from_a_long_queue(
    empty_database: str,
) -> None:
    """A 0.2 database (version 9) with 30,000 ready chunks, one session calling 0.2's claim
    every 20 ms and three calling it back to back (a daemon with free slots): each claim locks
    ``scheduled`` first, then ``chunks``, ``jobs``, ``ready``, ``attempts``. Every later
    migration and the definitions must get their locks within a bounded wait (a step that took
    ``ready`` before ``scheduled`` timed out on every try: docs/migrations.md, The lock order),
    and the claims go on, without an error, through it and after it."""
    conn = await connect(empty_database)
    claimers = [await connect(empty_database, application_name="old-daemon") for _ in range(4)]
    stop = asyncio.Event()
    claimed: list[int] = []
    errors: list[str] = []

    async def claim(claimer: asyncpg.Connection, pause_s: float) -> None:
        while not stop.is_set():
            try:
                rows = await claimer.fetch(
                    "SELECT * FROM chunkd.claim_or_wait('old-host:7:abc', 1, NULL, 600, NULL)"
                )
            except asyncpg.PostgresError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                claimed.extend(r["id"] for r in rows if r["id"] is not None)
            await asyncio.sleep(pause_s)

    tasks: list[asyncio.Future[None]] = []
    try:
        await apply_migrations(conn, up_to=9)
        for _ in range(3):
            await conn.fetchval(
                "SELECT chunkd.create_sync_job('big', (SELECT jsonb_agg('{}'::jsonb)"
                " FROM generate_series(1, 10000)), '{}')"
            )
        assert await conn.fetchval("SELECT count(*) FROM chunkd.ready") == 30_000
        tasks = [
            asyncio.ensure_future(claim(c, pause_s))
            for c, pause_s in zip(claimers, (0.02, 0, 0, 0), strict=True)
        ]
        await wait_until(lambda: _true(len(claimed) >= 20), timeout_s=10, what="claims")
        migrated = await apply_migrations(conn, lock_wait_s=10)
        assert migrated.versions == [m.version for m in migrations() if m.version > 9]
        assert migrated.definitions == tuple(d.path for d in definitions())
        before = len(claimed)
        await wait_until(lambda: _true(len(claimed) >= before + 20), timeout_s=10, what="claims")
        stop.set()
        await asyncio.gather(*tasks)
        assert errors == []
        assert len(set(claimed)) == len(claimed), "each chunk claimed once"
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for claimer in claimers:
            await claimer.close()
        await conn.close()


async def _true(value: bool) -> bool:
    return value
