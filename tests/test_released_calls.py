"""A step that drops a function is refused while daemons of another release run only when
that release's daemon calls it (chunkd/db/released.py, generated from each release's
sql/queries.sql); a daemon of a version chunkd does not know stops every drop."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from chunkd.db import connect
from chunkd.db import migrate as migrate_module
from chunkd.db.migrate import apply_migrations
from chunkd.db.released import DAEMON_CALLS, RELEASE_COMMITS, daemon_objects
from chunkd.db.sql_files import Migration, definitions, migrations
from chunkd.errors import ChunkdError
from resources import missing

ROOT = Path(__file__).resolve().parents[1]


async def _alive(conn, version: str) -> None:
    """A daemon of ``version`` that heartbeat just now."""
    await conn.execute(
        "INSERT INTO chunkd.workers (worker_id, host, pid, version, kinds, concurrency)"
        " VALUES ('old-host:7:abc', 'old-host', 7, $1, '{k}', 4)",
        version,
    )


def _plant(monkeypatch: pytest.MonkeyPatch, name: str, sql: str) -> Migration:
    planted = Migration(migrations()[-1].version + 1, name, sql)
    monkeypatch.setattr(migrate_module, "migrations", lambda: (*migrations(), planted))
    return planted


def test_each_release_s_row_is_what_its_daemon_s_statements_call() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        missing("git and this repository's history are needed to read the released queries")
    for release, commit in RELEASE_COMMITS.items():
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:sql/queries.sql"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if shown.returncode != 0:
            missing(f"commit {commit[:12]} (release {release}) is not in this clone's history")
        version = subprocess.run(
            ["git", "-C", str(ROOT), "grep", "-h", "__version__ = ", commit, "--", "daemon"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f'"{release}"' in version, (release, version)
        assert DAEMON_CALLS[release] == daemon_objects(shown.stdout), release


def test_every_dated_release_has_a_row() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    dated = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.MULTILINE)
    assert dated and set(dated) == set(DAEMON_CALLS) == set(RELEASE_COMMITS)


async def test_a_live_0_1_daemon_does_not_stop_the_upgrade_from_version_1(
    empty_database: str,
) -> None:
    """Migration 2 drops chunkd.job_finished_at(uuid) and more, which 0.1's daemon never
    called: docs/storage.md says a live version 1 database upgrades with its daemons running."""
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=1)
        await _alive(conn, "0.1.0")
        migrated = await apply_migrations(conn)
        assert migrated.versions == [m.version for m in migrations()][1:]
        assert migrated.definitions == tuple(d.path for d in definitions())
    finally:
        await conn.close()


async def test_a_drop_is_refused_only_while_a_release_that_calls_it_runs(
    conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 0.1's claim: 0.2's daemon never calls it, 0.1's does.
    planted = _plant(
        monkeypatch,
        "drop_old_claim",
        "DROP FUNCTION chunkd.claim_next_chunk_job_safe(text, int, text[], interval);",
    )
    await _alive(conn, "0.1.0")
    with pytest.raises(ChunkdError) as refused:
        await apply_migrations(conn)
    assert re.sub(r"for \d+ s more", "for N s more", str(refused.value)) == (
        f"migration {planted.version} (drop_old_claim) drops chunkd.claim_next_chunk_job_safe"
        "(text,integer,text[],interval), which running daemons of chunkd 0.1.0 call: stop them "
        "first (old-host:7:abc), then run chunkd migrate again (a daemon killed without stopping"
        " counts as running for N s more: until 5 minutes after its last heartbeat); nothing of"
        " it was applied"
    )
    assert await conn.fetchval(
        "SELECT to_regprocedure('chunkd.claim_next_chunk_job_safe(text,int,text[],interval)')"
    ), "rolled back"
    await conn.execute("UPDATE chunkd.workers SET version = '0.2.0'")
    assert (await apply_migrations(conn)).versions == [planted.version]


async def test_a_daemon_of_an_unknown_version_stops_every_drop(
    conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = _plant(monkeypatch, "drop_a_helper", "DROP FUNCTION chunkd.clip_error(text);")
    await _alive(conn, "0.2.7")
    with pytest.raises(ChunkdError) as refused:
        await apply_migrations(conn)
    assert str(refused.value).startswith(
        f"migration {planted.version} (drop_a_helper) drops chunkd.clip_error(text), which "
        "running daemons of chunkd 0.2.7 (a version this chunkd has no list of calls for) may "
        "call: stop them first (old-host:7:abc)"
    )
