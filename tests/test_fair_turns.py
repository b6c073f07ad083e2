"""Fair turns (docs/guarantees.md): jobs of equal priority take turns, so a steady stream of
small jobs never starves a long one, and a job's own chunks still go in seq order.

The issue's input: one daemon, --concurrency 4, a handler of 50 ms; job A of 3,000 chunks;
once about 100 of A's chunks are done, a new job of 10 chunks every 0.1 s for 15 s (more work
than the daemon can do). Before fair turns A got no claim at all in those 15 s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from typing import Any
from uuid import UUID

import asyncpg

from daemon_helpers import wait_until
from sql_helpers import claim, create_job

STREAM_S = 15.0


async def _claims(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every claim in the order the daemon made them (one statement's claims share claimed_at:
    the checks below compare statements)."""
    return await conn.fetch(
        "SELECT j.public_id AS job, c.seq, a.claimed_at, a.n"
        " FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id"
        " JOIN chunkd.jobs j ON j.id = a.job_id ORDER BY a.claimed_at, a.chunk_id"
    )


def _statements(claims: list[asyncpg.Record]) -> list[list[asyncpg.Record]]:
    out: list[list[asyncpg.Record]] = []
    for c in claims:
        if out and out[-1][0]["claimed_at"] == c["claimed_at"]:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def _most_claims_of_another_job_between(
    statements: list[list[asyncpg.Record]], job: UUID
) -> tuple[int, Any]:
    """Over every two consecutive claim statements that took chunks of ``job``: the most
    chunks any single other job got in the statements strictly between them."""
    worst: tuple[int, Any] = (0, None)
    with_job = [i for i, s in enumerate(statements) if any(c["job"] == job for c in s)]
    for a, b in itertools.pairwise(with_job):
        between = Counter(c["job"] for s in statements[a + 1 : b] for c in s if c["n"] == 1)
        if between:
            other, n = between.most_common(1)[0]
            worst = max(worst, (n, (statements[a][0]["claimed_at"], other)), key=lambda w: w[0])
    return worst


async def test_a_stream_of_small_jobs_does_not_starve_a_long_one(db, start) -> None:
    long_job = await create_job(db, [{"sleep_s": 0.05}] * 3000, kind="fair")
    daemon = start("--handler", "fair=bad_handlers:slow_echo", "--concurrency", "4")
    await wait_until(
        lambda: db.fetchval(
            "SELECT completed_chunks >= 100 FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            long_job,
        ),
        timeout_s=60,
        what="100 chunks of the long job",
    )
    started = time.monotonic()
    stream: list[UUID] = []
    while time.monotonic() - started < STREAM_S:
        stream.append(await create_job(db, [{"sleep_s": 0.05}] * 10, kind="fair"))
        await asyncio.sleep(0.1)
    window_end = await db.fetchval("SELECT now()")
    daemon.kill()

    claims = await _claims(db)
    first_small = min(c["claimed_at"] for c in claims if c["job"] != long_job)
    in_window = [c for c in claims if first_small <= c["claimed_at"] <= window_end]
    of_long = [c for c in in_window if c["job"] == long_job]
    others = len(in_window) - len(of_long)
    # More work was offered than done: the small jobs are always behind, yet A keeps its turn.
    assert len(stream) >= 100 and others > 200, (len(stream), others)
    assert len(of_long) >= 15, f"the long job got {len(of_long)} of {len(in_window)} claims"
    # The bound: between two claims of A, no other job got more than two.
    worst, where = _most_claims_of_another_job_between(_statements(in_window), long_job)
    assert worst <= 2, f"another job got {worst} claims between two of the long job's: {where}"
    # A's own chunks went in seq order.
    seqs = [c["seq"] for c in claims if c["job"] == long_job]
    assert seqs == sorted(seqs)


async def test_turns_keep_a_jobs_seq_order_and_priority_first(conn) -> None:
    """SQL alone: a job arriving later is served in the current round; a higher priority
    still goes first; appended chunks follow the job's waiting ones."""
    await create_job(conn, 30, kind="t")
    await claim(conn, "w", 20, kinds=["t"])
    later = await create_job(conn, 3, kind="t")
    urgent = await create_job(conn, 2, kind="t", priority=5)
    rows = await claim(conn, "w", 8, kinds=["t"])
    jobs = [("urgent" if r["parent_sync_job_id"] == urgent else
             "later" if r["parent_sync_job_id"] == later else "first") for r in rows]  # fmt: skip
    assert jobs == ["urgent", "urgent", "first", "later", "first", "later", "first", "later"]
    # An open job's appended chunks go after its waiting ones, not at the current turn.
    open_job = await conn.fetchval(
        "SELECT chunkd.create_sync_job('t2', $1::jsonb, open => true)", json.dumps([0, 1, 2])
    )
    await conn.execute("SELECT chunkd.append_chunks($1, '[3, 4]')", open_job)
    rows = await claim(conn, "w", 10, kinds=["t2"])
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4]


async def _serve_rounds(
    conn: asyncpg.Connection, rounds: int, arrive: Any, kinds: list[str] | None = None
) -> list[tuple[UUID, int]]:
    """A worker loop in SQL: each round a new job arrives (``arrive``), the worker claims 4
    chunks and completes them. Returns, in claim order, each claimed chunk's job and how many
    jobs were unfinished in that round."""
    served: list[tuple[UUID, int]] = []
    for _ in range(rounds):
        await arrive()
        unfinished = await conn.fetchval(
            "SELECT count(*) FROM chunkd.jobs WHERE kind LIKE 's%' AND finished_at IS NULL"
        )
        rows = await claim(conn, "w", 4, kinds=kinds or ["s"])
        for r in rows:
            served.append((r["parent_sync_job_id"], unfinished))
            assert await conn.fetchval(
                "SELECT chunkd.complete_chunk_job_safe($1, 'w', $2)", r["queue_id"], r["attempt"]
            )
    return served


def _check_turns(served: list[tuple[UUID, int]], job: UUID) -> None:
    """The long job is served to the end, and waits no more than two claims per other job
    with work (the bound of docs/guarantees.md), plus one batch."""
    mine = [i for i, (j, _) in enumerate(served) if j == job]
    assert mine and mine[-1] >= len(served) - 4 * max(n for _, n in served), mine
    for a, b in itertools.pairwise([-1, *mine]):
        unfinished = served[b][1]
        assert b - a - 1 <= 2 * (unfinished - 1) + 4, (a, b, unfinished)


async def test_limited_jobs_and_retried_chunks_take_turns_too(conn) -> None:
    """The same kind through other doors: the slow path (jobs under max_concurrency) and
    chunks coming back from a retry's backoff both join at the current turn. (Before fair
    turns, the long job got no claim at all in either stream.)"""
    long_job = await create_job(conn, 400, kind="s", max_concurrency=4)
    for _ in range(5):
        await _serve_rounds(conn, 1, lambda: asyncio.sleep(0))

    async def limited_arrives() -> None:
        await create_job(conn, 6, kind="s", max_concurrency=4)

    _check_turns(await _serve_rounds(conn, 40, limited_arrives), long_job)

    # Retries: chunks of other jobs failing and coming back (scheduled, then promoted) do not
    # go ahead of the long job for all of them. (Another worker fails them at once: kind s2.)
    async def retry_arrives() -> None:
        await create_job(conn, 3, kind="s2")
        for r in await claim(conn, "f", 3, kinds=["s2"]):
            await conn.fetchval(
                "SELECT chunkd.fail_chunk_job_safe($1, 'f', $2, 'again', true, '1 ms')",
                r["queue_id"], r["attempt"],
            )  # fmt: skip
        await asyncio.sleep(0.002)

    _check_turns(await _serve_rounds(conn, 40, retry_arrives, kinds=["s", "s2"]), long_job)


async def test_a_job_held_back_by_its_limit_does_not_hold_back_the_current_turn(conn) -> None:
    """A job under a limit falls behind in turns while its slot is taken; a job enqueued then
    joins the round of the jobs under way, not the turn the held job waits at. (It joined
    there: in the chaos soak's mixed workload a new job of 587 chunks took 334 claims in a row
    ahead of every job under way, J = 18.)"""
    long_job = await create_job(conn, 400, kind="t")
    held = await create_job(conn, 10, kind="t", max_concurrency=1)
    first = await claim(conn, "w", 2, kinds=["t"])  # both jobs' chunk 0; held's stays claimed
    assert {r["parent_sync_job_id"] for r in first} == {long_job, held}
    for _ in range(50):
        rows = await claim(conn, "w", 4, kinds=["t"])
        assert {r["parent_sync_job_id"] for r in rows} == {long_job}
    new = await create_job(conn, 50, kind="t")
    served = Counter(r["parent_sync_job_id"] for r in await claim(conn, "w", 20, kinds=["t"]))
    assert served[long_job] >= 9 and served[new] >= 9, served


async def test_a_job_enqueued_while_only_limited_work_waits_does_not_go_ahead_of_it(conn) -> None:
    """When no chunk under no limit waits, a new job takes its turns after the limited work
    waiting, not from the lowest turn a held-back job waits at: a max_concurrency = 1 job
    that joined the round later would wait for every chunk of the new job up to its own turn
    (573 claims in a row in the chaos soak)."""
    long_job = await create_job(conn, 60, kind="t")
    held = await create_job(conn, 10, kind="t", max_concurrency=1)  # stays behind at turn 1
    await claim(conn, "w", 2, kinds=["t"])  # chunk 0 of each; held's stays in flight
    await claim(conn, "w", 49, kinds=["t"])
    later = await create_job(conn, 10, kind="t", max_concurrency=1)  # joins at the round
    rows = await claim(conn, "w", 20, kinds=["t"])  # the rest of the long job, later's chunk 0
    assert Counter(r["parent_sync_job_id"] for r in rows) == {long_job: 10, later: 1}
    (first,) = [r for r in rows if r["parent_sync_job_id"] == later]
    assert await conn.fetchval(
        "SELECT chunkd.complete_chunk_job_safe($1, 'w', $2)", first["queue_id"], first["attempt"]
    )
    new = await create_job(conn, 50, kind="t")
    served = [r["parent_sync_job_id"] for r in await claim(conn, "w", 4, kinds=["t"])]
    assert later in served and new in served, (served, held)
