"""Prefetch never parks work behind long handlers (docs/guarantees.md, "Prefetch").

The issue's input (K16): two daemons with ``--concurrency 2`` that have been running short
chunks; then two 15 s chunks (priority 5) and a ``max_concurrency = 1`` job of short chunks,
enqueued together. One daemon used to claim both long chunks and the ordered job's chunk 0 in
one statement; chunk 0 waited 15 s in its local queue while the other daemon idled: the 0.5 s
job took 15.7 s.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import asyncpg

from daemon_helpers import wait_until
from sql_helpers import create_job

KIND = "k16"


async def _warm(db: asyncpg.Connection, start: Any) -> list[Any]:
    """Two daemons that have measured short handlers (so they prefetch)."""
    daemons = [
        start("--handler", f"{KIND}=bad_handlers:slow_echo", "--concurrency", "2") for _ in range(2)
    ]
    warm = await create_job(db, [{"sleep_s": 0.005}] * 400, kind=KIND)
    await wait_until(lambda: _finished(db, warm), timeout_s=60, what="the warm-up job")
    return daemons


async def _finished(db: asyncpg.Connection, job: UUID) -> bool:
    return bool(
        await db.fetchval("SELECT finished_at IS NOT NULL FROM chunkd.sync_jobs WHERE id = $1", job)
    )


async def _two_long_chunks(db: asyncpg.Connection) -> UUID:
    return await create_job(db, [{"sleep_s": 15}, {"sleep_s": 15}], kind=KIND, priority=5)


async def _time_to_finish(db: asyncpg.Connection, job: UUID) -> float:
    started = time.monotonic()
    await wait_until(lambda: _finished(db, job), timeout_s=30, what="the short job")
    return time.monotonic() - started


async def test_an_ordered_job_is_not_parked_behind_long_chunks(db, start) -> None:
    await _warm(db, start)
    await _two_long_chunks(db)
    ordered = await create_job(db, [{"sleep_s": 0.1}] * 5, kind=KIND, max_concurrency=1)
    took = await _time_to_finish(db, ordered)
    assert took < 3, f"the 0.5 s ordered job took {took:.1f} s"
    # No chunk of it was claimed by a daemon busy with a long chunk and left waiting.
    waits = await db.fetch(
        "SELECT c.seq, a.outcome FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id"
        " JOIN chunkd.jobs j ON j.id = a.job_id WHERE j.public_id = $1 ORDER BY c.seq, a.n",
        ordered,
    )
    assert [w["outcome"] for w in waits] == ["completed"] * 5, waits


async def test_a_concurrency_key_slot_is_not_held_by_a_prefetched_chunk(db, start) -> None:
    """The same kind through a concurrency key: its one slot is not held by a waiting chunk."""
    await db.execute("SELECT chunkd.set_concurrency_limit('tenant', 1)")
    await _warm(db, start)
    await _two_long_chunks(db)
    keyed = await create_job(db, [{"sleep_s": 0.1}] * 5, kind=KIND, concurrency_key="tenant")
    took = await _time_to_finish(db, keyed)
    assert took < 3, f"the 0.5 s keyed job took {took:.1f} s"


async def test_prefetched_chunks_not_started_in_time_go_back_without_an_attempt(db, start) -> None:
    """Unlimited work may be prefetched, but one not started within a second is handed back
    (no attempt spent) and an idle daemon runs it. One daemon takes the long chunks and
    prefetches the short ones behind them; a second daemon starts only after that."""
    busy = start("--handler", f"{KIND}=bad_handlers:slow_echo", "--concurrency", "2")
    warm = await create_job(db, [{"sleep_s": 0.005}] * 200, kind=KIND)
    await wait_until(lambda: _finished(db, warm), timeout_s=60, what="the warm-up job")
    await _two_long_chunks(db)
    short = await create_job(db, [{"sleep_s": 0.05}] * 4, kind=KIND)
    await busy.wait_for_event("prefetch.released", timeout_s=10)
    start("--handler", f"{KIND}=bad_handlers:slow_echo", "--concurrency", "2")
    took = await _time_to_finish(db, short)
    assert took < 10, f"the short job took {took:.1f} s (a long chunk takes 15)"
    attempts = await db.fetch(
        "SELECT a.outcome, a.attempt, a.worker_id FROM chunkd.attempts a JOIN chunkd.jobs j"
        " ON j.id = a.job_id WHERE j.public_id = $1 ORDER BY a.claimed_at",
        short,
    )
    assert {a["attempt"] for a in attempts} == {1}, "a release spends no attempt"
    released = [a for a in attempts if a["outcome"] == "released"]
    assert released, attempts
    # Released once each, not claimed back by the busy daemon (its prefetch pauses).
    events = [e for e in busy.events() if e["event"] == "prefetch.released"]
    assert [e["chunks"] for e in events] == [len(released)], events
    assert events[0]["reason"] == "not started within 1s of the claim"
    assert [a["outcome"] for a in attempts].count("completed") == 4
