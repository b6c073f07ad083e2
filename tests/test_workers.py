"""The workers registry: a daemon pruned while it lived registers again, and `chunkd workers`
takes a daemon for dead when the reaper does (issue #21, F3 and F5).
"""

from __future__ import annotations

import asyncio
import json
import signal

import asyncpg
import httpx

from daemon_helpers import run_chunkd, wait_until
from sql_helpers import create_job
from web_helpers import serve

ALIVE = "SELECT chunkd.worker_alive($1, 5, 'h', 7, '0.3.0', '{mail}', 4)"


async def _row(conn: asyncpg.Connection, worker: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM chunkd.workers WHERE worker_id = $1", worker)


async def test_a_heartbeat_registers_a_pruned_worker_again(conn) -> None:
    await conn.execute("SELECT chunkd.register_worker('w', 'h', 7, '0.3.0', '{mail}', 4)")
    await conn.execute(ALIVE, "w")
    started = (await _row(conn, "w"))["started_at"]
    # Silent for 16 minutes (a SIGSTOP, a frozen VM, a forward clock step), holding nothing.
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '16 minutes'"
    )
    assert await conn.fetchval("SELECT chunkd.prune_workers(900)") == 1
    assert await _row(conn, "w") is None
    clock = await conn.fetchval(ALIVE, "w")
    row = await _row(conn, "w")
    assert row is not None, "registered again by its heartbeat"
    assert (row["host"], row["pid"], row["version"], row["kinds"], row["concurrency"]) == (
        "h", 7, "0.3.0", ["mail"], 4,
    )  # fmt: skip
    assert row["heartbeat_s"] == 5.0 and row["last_heartbeat_at"] <= clock
    assert row["started_at"] > started  # registered again now
    # A heartbeat of a row that is there changes nothing but the heartbeat.
    await conn.execute("SELECT chunkd.worker_alive('w', 2, 'other', 8, '9', '{x}', 1)")
    again = await _row(conn, "w")
    assert (again["host"], again["kinds"], again["heartbeat_s"]) == ("h", ["mail"], 2.0)
    assert again["started_at"] == row["started_at"]
    # Without its registration (the two-argument call) a missing row stays missing.
    await conn.execute("SELECT chunkd.worker_alive('gone', 5)")
    assert await _row(conn, "gone") is None
    await conn.execute("SELECT chunkd.worker_alive('w', 5)")
    assert (await _row(conn, "w"))["heartbeat_s"] == 5.0


async def test_a_daemon_pruned_while_it_works_is_listed_again(conn, database, start) -> None:
    """Issue #21, F3: a daemon whose row prune_workers deleted (after a +16 min clock step, or
    a 15-minute SIGSTOP) stayed missing from `chunkd workers` and the dashboard while it
    worked: its heartbeat only UPDATEd. Its next heartbeat now registers it again, and it
    goes on claiming."""
    daemon = start("--handler", "test=bad_handlers:echo", "--lease", "3s")  # heartbeat: 1 s
    worker = (await daemon.wait_for_event("daemon.ready"))["worker_id"]
    await wait_until(lambda: _row(conn, worker), timeout_s=10, what="its row")
    async with conn.transaction():  # as the reaper prunes a row silent for 16 minutes
        await conn.execute(
            "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '16 minutes'"
            " WHERE worker_id = $1",
            worker,
        )
        assert await conn.fetchval("SELECT chunkd.prune_workers(900)") == 1
    assert await _row(conn, worker) is None
    await wait_until(lambda: _row(conn, worker), timeout_s=10, what="its next heartbeat")
    listed = await asyncio.to_thread(run_chunkd, "workers", "--json", "--dsn", database.dsn)
    assert [(w["worker_id"], w["state"]) for w in json.loads(listed.stdout)] == [(worker, "live")]
    job = await create_job(conn, 3)
    await wait_until(
        lambda: conn.fetchval(
            "SELECT overall_status = 'completed' FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        ),
        timeout_s=20,
        what="the job",
    )
    assert await daemon.stop() == 0


async def _beat_ago(conn: asyncpg.Connection, worker: str, seconds: float) -> None:
    """Its last heartbeat, and every claim it holds, ``seconds`` ago."""
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - make_interval(secs => $2)"
        " WHERE worker_id = $1",
        worker,
        seconds,
    )
    await conn.execute(
        "UPDATE chunkd.attempts SET claimed_at = now() - make_interval(secs => $2)"
        " WHERE worker_id = $1 AND ended_at IS NULL",
        worker,
        seconds,
    )


async def _states(dsn: str, *args: str, **env: str) -> dict[str, tuple[str, float | None]]:
    listed = await asyncio.to_thread(
        run_chunkd, "workers", "--json", "--dsn", dsn, *args, env=env or None
    )
    assert listed.code == 0, listed.stderr
    return {w["worker_id"]: (w["state"], w.get("stale_after_s")) for w in json.loads(listed.stdout)}


async def test_chunkd_workers_says_stale_when_the_reaper_takes_it_for_dead(conn, database) -> None:
    """Issue #21, F5: `chunkd workers` showed a killed daemon `live` 32 s after its last
    heartbeat (stale only after --stale-after, 2m) while the reaper had already returned its
    chunks. A daemon that says how often it heartbeats is stale after three of them, as the
    reaper counts; one that does not (chunkd 0.2) after 2m; --stale-after still decides when
    given. `chunkd status JOB` and the dashboard count live workers the same way."""
    for worker, heartbeat_s in (("dead", 5), ("live", 5), ("old-live", None), ("old-dead", None)):
        await conn.execute(
            "SELECT chunkd.register_worker($1, 'h', 1, '0.3.0', '{mail}', 4)", worker
        )
        if heartbeat_s is not None:
            await conn.execute("SELECT chunkd.worker_alive($1, $2)", worker, heartbeat_s)
    job = await create_job(conn, 2, kind="mail")
    for worker in ("dead", "live"):
        await conn.fetch("SELECT * FROM chunkd.claim_next_chunk_job_safe($1, 1)", worker)
    for worker, ago in (("dead", 20), ("live", 10), ("old-live", 50), ("old-dead", 180)):
        await _beat_ago(conn, worker, ago)

    reaped = await conn.fetch("SELECT worker_id, rule FROM chunkd.reap_attempts()")
    assert [(r["worker_id"], r["rule"]) for r in reaped] == [("dead", "worker")]
    assert await _states(database.dsn) == {
        "dead": ("stale", 15.0),  # as the reaper just found
        "live": ("live", 15.0),
        "old-live": ("live", 120.0),
        "old-dead": ("stale", 120.0),
    }
    given = {"dead": ("live", 60.0), "live": ("live", 60.0), "old-live": ("live", 60.0)}
    assert await _states(database.dsn, "--stale-after", "1m") == {
        **given,
        "old-dead": ("stale", 60.0),
    }
    assert await _states(database.dsn, CHUNKD_STALE_AFTER="5s") == {
        w: ("stale", 5.0) for w in ("dead", "live", "old-live", "old-dead")
    }

    # The same rule for "a live worker handles this kind": only `dead` and `old-dead` left.
    await conn.execute("DELETE FROM chunkd.workers WHERE worker_id IN ('live', 'old-live')")
    detail = await asyncio.to_thread(
        run_chunkd, "status", str(job), "--json", "--dsn", database.dsn
    )
    assert json.loads(detail.stdout)["note"] == "no live worker handles kind 'mail'"
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        table = (await http.get("/workers", params={"part": "table"})).text
        assert 'data-worker="dead" data-live="0"' in table
        assert "missed three of its heartbeats" in table
        page = (await http.get(f"/jobs/{job}")).text
        assert "no live worker" in page.lower()


async def test_a_killed_daemon_is_stale_in_chunkd_workers_within_three_heartbeats(
    conn, database, start
) -> None:
    """A real daemon (--lease 3s: a heartbeat every second) killed: `chunkd workers` calls it
    stale within three heartbeats of its last, not after 2 minutes."""
    daemon = start("--handler", "test=bad_handlers:echo", "--lease", "3s")
    worker = (await daemon.wait_for_event("daemon.ready"))["worker_id"]
    await wait_until(lambda: _row(conn, worker), timeout_s=10, what="its row")
    assert (await _states(database.dsn))[worker][0] == "live"
    daemon.signal(signal.SIGKILL)
    await daemon.wait()

    async def stale() -> bool:
        return (await _states(database.dsn))[worker][0] == "stale"

    await wait_until(stale, timeout_s=15, what="`chunkd workers` to call it stale")
    age = await conn.fetchval(
        "SELECT extract(epoch FROM now() - last_heartbeat_at) FROM chunkd.workers"
        " WHERE worker_id = $1",
        worker,
    )
    assert age < 10, "stale after 3 s of silence, not 2 minutes"
