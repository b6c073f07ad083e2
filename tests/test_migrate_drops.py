"""Which registered daemons count as running when a migration step would drop what they call:
those whose last heartbeat is within three of their heartbeat intervals (the reaper's rule),
or, for a daemon that does not say how often it heartbeats (0.1, 0.2), within 5 minutes; and
the refusal says how long a daemon killed without stopping keeps counting."""

from __future__ import annotations

import re

import pytest

from chunkd.db import migrate as migrate_module
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import Migration, migrations
from chunkd.errors import ChunkdError


def _plant(monkeypatch: pytest.MonkeyPatch) -> Migration:
    planted = Migration(
        migrations()[-1].version + 1,
        "drop_next_schedule_at",
        "DROP FUNCTION chunkd.next_schedule_at();",
    )
    monkeypatch.setattr(migrate_module, "migrations", lambda: (*migrations(), planted))
    return planted


async def _registered(conn, heartbeat_s: float | None, silent_s: float) -> None:
    """A 0.2.0 daemon (whose release calls next_schedule_at) last heard of ``silent_s`` ago."""
    await conn.execute(
        "INSERT INTO chunkd.workers (worker_id, host, pid, version, kinds, concurrency,"
        " heartbeat_s, last_heartbeat_at) VALUES ('old-host:7:abc', 'old-host', 7, '0.2.0',"
        " '{k}', 4, $1, now() - make_interval(secs => $2))",
        heartbeat_s,
        silent_s,
    )


async def test_a_killed_daemon_stops_counting_after_three_missed_heartbeats(
    conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = _plant(monkeypatch)
    await _registered(conn, heartbeat_s=1.0, silent_s=5.0)  # killed 5 s ago
    assert (await apply_migrations(conn)).versions == [planted.version]


async def test_the_refusal_says_how_long_a_killed_daemon_keeps_counting(
    conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = _plant(monkeypatch)
    await _registered(conn, heartbeat_s=20.0, silent_s=10.0)
    with pytest.raises(ChunkdError) as refused:
        await apply_migrations(conn)
    line = str(refused.value)
    found = re.fullmatch(
        rf"migration {planted.version} \(drop_next_schedule_at\) drops chunkd.next_schedule_at\(\),"
        r" which running daemons of chunkd 0\.2\.0 call: stop them first \(old-host:7:abc\), then"
        r" run chunkd migrate again \(a daemon killed without stopping counts as running for (\d+)"
        r" s more: until it has missed three heartbeats of 20 s\); nothing of it was applied",
        line,
    )
    assert found, line
    assert 40 <= int(found[1]) <= 50, line


async def test_a_daemon_that_does_not_say_how_often_it_heartbeats_counts_for_5_minutes(
    conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = _plant(monkeypatch)
    await _registered(conn, heartbeat_s=None, silent_s=240.0)
    with pytest.raises(ChunkdError) as refused:
        await apply_migrations(conn)
    found = re.search(
        r"counts as running for (\d+) s more: until 5 minutes after its last heartbeat\)",
        str(refused.value),
    )
    assert found and 50 <= int(found[1]) <= 60, str(refused.value)
    await conn.execute("UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '301 s'")
    assert (await apply_migrations(conn)).versions == [planted.version]
