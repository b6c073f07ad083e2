"""The reaper's two rules, in SQL (docs/guarantees.md, "Leases"): an attempt whose lease ran out,
and an attempt a dead worker made (it missed three heartbeats, and made the claim before its
next heartbeat was due).

Issue #21, F1: after a forward step of the database clock (+20 s against a 15 s lease, the
registry heartbeat every 5 s) the dead-worker rule took a live daemon for dead until its next
heartbeat and reaped every claim it made meanwhile, pass after pass: both chunks of the job
failed after three attempts within 1.8 s. A step is simulated here as the database sees it:
every stored time moves back by the step (now() moved forward).
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from sql_helpers import claim, create_job, expire_leases

STEP = timedelta(seconds=20)
LEASE = timedelta(minutes=10)  # no lease runs out here: only the registry rule can reap


async def _register(conn: asyncpg.Connection, worker: str, heartbeat_s: float = 5.0) -> None:
    await conn.execute("SELECT chunkd.register_worker($1, 'h', 1, '0.3.0', '{test}', 4)", worker)
    await conn.execute("SELECT chunkd.worker_alive($1, $2)", worker, heartbeat_s)


async def _step(conn: asyncpg.Connection, step: timedelta = STEP) -> None:
    """The database clock jumps forward by ``step``: the registry and the attempts made so far
    lie that much further in the past."""
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = last_heartbeat_at - $1::interval,"
        " started_at = started_at - $1::interval",
        step,
    )
    await conn.execute(
        "UPDATE chunkd.attempts SET claimed_at = claimed_at - $1::interval,"
        " lease_expires_at = lease_expires_at - $1::interval WHERE ended_at IS NULL",
        step,
    )


async def _reap(conn: asyncpg.Connection) -> list[tuple[int, int, str, str]]:
    """(seq, attempt, worker, rule) of each attempt reaped."""
    rows = await conn.fetch("SELECT * FROM chunkd.reap_attempts()")
    return [(r["seq"], r["attempt"], r["worker_id"], r["rule"]) for r in rows]


async def test_a_clock_step_reaps_the_claims_in_flight_once_not_the_claims_after_it(
    conn,
) -> None:
    await create_job(conn, 3)
    await _register(conn, "live")
    (a,) = await claim(conn, "live", 1, lease=LEASE)
    await _step(conn)  # the daemon has not heartbeated since: by the database clock, dead
    (b,) = await claim(conn, "live", 1, lease=LEASE)  # a claim made after the step
    assert b["seq"] != a["seq"]

    assert await _reap(conn) == [(a["seq"], 1, "live", "worker")], "only the claim in flight"
    error = await conn.fetchval("SELECT error FROM chunkd.attempts WHERE outcome = 'reaped'")
    assert error == "worker stopped heartbeating"
    # Claimed again after the step: protected by its lease, pass after pass, until the
    # daemon's next heartbeat (before, every pass reaped every new claim and spent an attempt).
    again = await claim(conn, "live", 2, lease=LEASE)
    assert sorted(r["seq"] for r in again) == sorted([a["seq"], 2])
    for _ in range(3):
        assert await _reap(conn) == []
    await conn.execute("SELECT chunkd.worker_alive('live', 5)")
    assert await _reap(conn) == []
    open_attempts = await conn.fetch(
        "SELECT c.seq, a.attempt FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id"
        " WHERE a.ended_at IS NULL ORDER BY c.seq"
    )
    assert [(r["seq"], r["attempt"]) for r in open_attempts] == [(0, 2), (1, 1), (2, 1)]


async def test_a_dead_workers_claims_are_all_reaped_up_to_its_next_heartbeat(conn) -> None:
    """A daemon killed: every claim it made before its next heartbeat was due is reaped by the
    registry rule, at the boundary too; a claim after that (which a dead daemon cannot have
    made) waits for its lease."""
    await create_job(conn, 3)
    await _register(conn, "gone", heartbeat_s=5.0)
    claims = await claim(conn, "gone", 3, lease=LEASE)
    beat = await conn.fetchval("SELECT last_heartbeat_at FROM chunkd.workers")
    # Claimed at the heartbeat, at the last moment before the next one was due, and after it.
    for row, offset in zip(claims, (0.0, 5.0, 5.001), strict=True):
        await conn.execute(
            "UPDATE chunkd.attempts a SET claimed_at = $2::timestamptz + make_interval(secs => $3)"
            " FROM chunkd.chunks c WHERE c.id = a.chunk_id AND c.queue_id = $1",
            row["queue_id"],
            beat,
            offset,
        )
    await _step(conn, timedelta(seconds=30))  # 30 s silent: dead
    reaped = await _reap(conn)
    assert sorted(reaped) == sorted((r["seq"], 1, "gone", "worker") for r in claims[:2])
    assert await _reap(conn) == []  # the third waits for its lease
    await expire_leases(conn)
    assert await _reap(conn) == [(claims[2]["seq"], 1, "gone", "lease")]


async def test_a_lease_that_ran_out_is_reaped_by_the_lease_rule_whatever_the_registry_says(
    conn,
) -> None:
    await create_job(conn, 2)
    await _register(conn, "w")
    first, second = await claim(conn, "w", 2, lease=LEASE)
    await expire_leases(conn, queue_ids=[first["queue_id"]])
    assert await _reap(conn) == [(first["seq"], 1, "w", "lease")]
    assert (
        await conn.fetchval("SELECT error FROM chunkd.attempts WHERE outcome = 'reaped'")
        == "lease expired"
    )
    # Both rules: the lease's is named.
    await _step(conn, timedelta(seconds=30))
    await expire_leases(conn, queue_ids=[second["queue_id"]])
    assert await _reap(conn) == [(second["seq"], 1, "w", "lease")]


async def test_the_older_reapers_return_the_same_chunks(conn) -> None:
    """chunkd 0.2's reap_expired() (its daemons call it) and the seed's cleanup_stuck_chunks()
    apply the same rules."""
    await create_job(conn, 2)
    await _register(conn, "live")
    await claim(conn, "live", 1, lease=LEASE)
    await _step(conn)
    await claim(conn, "live", 1, lease=LEASE)
    rows = await conn.fetch("SELECT * FROM chunkd.reap_expired()")
    assert [(r["seq"], r["attempt"], r["worker_id"], r["final"]) for r in rows] == [
        (0, 1, "live", False)
    ]
    assert "rule" not in rows[0]
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 0
    await conn.execute("SELECT chunkd.worker_alive('live', 5)")  # then killed
    await _step(conn)
    assert await conn.fetchval("SELECT chunkd.cleanup_stuck_chunks()") == 1
