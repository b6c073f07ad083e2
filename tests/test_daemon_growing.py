"""Jobs that grow, run by real ``chunkd run`` subprocesses: a 500-page continuation chain in
order (also with a daemon SIGKILLed in the middle), the ``$chunkd`` key of ``exec:``
handlers, a stale continuation fenced out, and the on_finish follow-up run once."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import textwrap

import asyncpg

from daemon_helpers import wait_until

CHAIN = "chain=daemon_handlers:chain"
FAST = ["--reap-interval", "300ms", "--lease", "2s"]


async def _chain_job(conn: asyncpg.Connection, last: int, slow_page: int | None = None):
    return await conn.fetchval(
        "SELECT chunkd.create_sync_job('chain', $1::jsonb, max_concurrency => 1)",
        json.dumps([{"page": 0, "last": last, "slow_page": slow_page}]),
    )


async def _finished(conn: asyncpg.Connection, job) -> bool:
    return await conn.fetchval(
        "SELECT finished_at IS NOT NULL FROM chunkd.sync_jobs WHERE id = $1", job
    )


async def _check_chain(conn: asyncpg.Connection, job, pages: int) -> list[asyncpg.Record]:
    """Every page once, seq = page, no gap, all completed, and the first run of each page
    started after the previous page ended (strict order)."""
    rows = await conn.fetch(
        "SELECT q.seq, c.payload, q.status, q.result FROM chunkd.chunk_processing_queue q "
        "JOIN chunkd.chunked_sync_jobs c ON c.id = q.chunk_id "
        "WHERE q.parent_sync_job_id = $1 ORDER BY q.seq",
        job,
    )
    assert [r["seq"] for r in rows] == list(range(pages)), "a gap or a duplicate seq"
    assert [r["payload"]["page"] for r in rows] == list(range(pages)), "a page appended twice"
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["result"] == {"page": r["seq"]} for r in rows)
    runs = await conn.fetch(
        "SELECT DISTINCT ON (seq) seq, started_at, ended_at FROM public.test_executions "
        "WHERE job_id = $1 ORDER BY seq, started_at",
        job,
    )
    assert [r["seq"] for r in runs] == list(range(pages))
    for before, after in itertools.pairwise(runs):
        assert before["ended_at"] <= after["started_at"], "pages ran out of order"
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["total_chunks"] == pages and progress["total_is_final"] is True
    events = await conn.fetch(
        "SELECT status FROM chunkd.job_events WHERE sync_job_id = $1 AND event = 'job_finished'",
        job,
    )
    assert [e["status"] for e in events] == ["completed"]
    return rows


async def test_a_chain_of_500_pages_runs_in_order_with_no_gap(db, start) -> None:
    job = await _chain_job(db, last=499)
    start("--handler", CHAIN, "--concurrency", "4", *FAST)
    start("--handler", CHAIN, "--concurrency", "4", *FAST)
    await wait_until(lambda: _finished(db, job), timeout_s=90, what="the chain to finish")
    await _check_chain(db, job, 500)
    runs = await db.fetchval("SELECT count(*) FROM public.test_executions WHERE job_id = $1", job)
    assert runs == 500, "no daemon died: every page ran exactly once"


async def test_a_chain_survives_a_daemon_sigkilled_in_the_middle(db, start) -> None:
    job = await _chain_job(db, last=499, slow_page=150)
    daemons = [start("--handler", CHAIN, "--concurrency", "4", *FAST) for _ in range(2)]

    async def holder_mid_chain() -> str | None:
        # The daemon running page 150 (which takes 2 s).
        return await db.fetchval(
            "SELECT a.worker_id FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id "
            "JOIN chunkd.jobs j ON j.id = a.job_id "
            "WHERE j.public_id = $1 AND a.ended_at IS NULL AND c.seq = 150",
            job,
        )

    worker_id = await wait_until(holder_mid_chain, timeout_s=60, what="the chain at page 150")
    pid = int(worker_id.split(":")[1])
    victim = next(d for d in daemons if d.pid == pid)
    os.kill(pid, signal.SIGKILL)
    assert victim.process.wait(10) == -signal.SIGKILL
    assert not await _finished(db, job), "the kill landed in the middle of the chain"
    daemons.append(start("--handler", CHAIN, "--concurrency", "4", *FAST))
    await wait_until(lambda: _finished(db, job), timeout_s=120, what="the chain to finish")
    await _check_chain(db, job, 500)
    reaped = await db.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE sync_job_id = $1 AND event = 'reaped'",
        job,
    )
    assert reaped == 1, "the killed daemon's page was recovered by the reaper"


EXEC_SCRIPT = textwrap.dedent(
    """
    import json, sys
    chunk = json.load(sys.stdin)
    page = chunk["payload"]["page"]
    out = {"page": page}
    if page < 3:
        out["$chunkd"] = {"append": [{"page": page + 1}]}
    print(json.dumps(out))
    """
)


async def test_exec_handler_appends_with_the_reserved_key(db, start, tmp_path) -> None:
    script = tmp_path / "pages.py"
    script.write_text(EXEC_SCRIPT)
    job = await db.fetchval(
        "SELECT chunkd.create_sync_job('pages', '[{\"page\": 0}]'::jsonb, max_concurrency => 1)"
    )
    start("--handler", f"pages=exec:{sys.executable} {script}", *FAST)
    await wait_until(lambda: _finished(db, job), timeout_s=60, what="the exec chain to finish")
    rows = await db.fetch(
        "SELECT seq, status, result FROM chunkd.chunk_processing_queue "
        "WHERE parent_sync_job_id = $1 ORDER BY seq",
        job,
    )
    # The reserved key is gone from the stored results.
    assert [(r["seq"], r["status"], r["result"]) for r in rows] == [
        (n, "completed", {"page": n}) for n in range(4)
    ]


async def test_a_bad_reserved_key_fails_the_chunk_with_a_clear_error(db, start, tmp_path) -> None:
    script = tmp_path / "typo.py"
    script.write_text('print(\'{"n": 1, "$chunkd": {"apend": [{}]}}\')\n')
    job = await db.fetchval("SELECT chunkd.create_sync_job('typo', '[{}]'::jsonb)")
    start("--handler", f"typo=exec:{sys.executable} {script}", *FAST)
    await wait_until(lambda: _finished(db, job), timeout_s=60, what="the chunk to fail")
    row = await db.fetchrow(
        "SELECT status, attempts, error_message FROM chunkd.chunk_processing_queue "
        "WHERE parent_sync_job_id = $1",
        job,
    )
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert 'unknown key(s) under "$chunkd": apend' in row["error_message"]


async def test_a_stale_daemons_continuation_is_fenced_out(db, start) -> None:
    """A daemon frozen (SIGSTOP) while its page runs loses the lease; another daemon runs the
    page and the rest of the chain. The frozen one, resumed, either cancels the page's handler
    at once (its lease ran out on its own clock) or, if the handler got its answer out first,
    has that completion and its appended page refused: no page is appended twice either way.
    (tests/test_sql_growing.py refuses a stale completion-with-append at the SQL level.)"""
    job = await db.fetchval(
        "SELECT chunkd.create_sync_job('chain', $1::jsonb, max_concurrency => 1)",
        json.dumps([{"page": 0, "last": 3, "slow_page": 0}]),
    )
    frozen = start("--handler", CHAIN, "--lease", "1s", "--reap-interval", "200ms")

    async def running() -> bool:
        return await db.fetchval("SELECT count(*) = 1 FROM chunkd.attempts WHERE ended_at IS NULL")

    await wait_until(running, timeout_s=30, what="page 0 to start")
    frozen.signal(signal.SIGSTOP)
    start("--handler", CHAIN, "--lease", "5s", "--reap-interval", "200ms")
    await wait_until(lambda: _finished(db, job), timeout_s=60, what="the chain to finish")
    frozen.signal(signal.SIGCONT)

    async def gave_up_page_0() -> dict[str, object] | None:
        for event in frozen.events():
            if event.get("seq") == 0 and (
                event.get("event") == "chunk.lease_lost"
                or (event.get("event") == "chunk.fenced" and event.get("outcome") == "completed")
            ):
                return event
        return None

    await wait_until(gave_up_page_0, timeout_s=30, what="the resumed daemon to give page 0 up")
    rows = await db.fetch(
        "SELECT seq FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1 ORDER BY seq", job
    )
    assert [r["seq"] for r in rows] == [0, 1, 2, 3]


async def test_on_finish_follow_up_runs_once_per_job(db, start) -> None:
    jobs = [
        await db.fetchval(
            "SELECT chunkd.create_sync_job('test', $1::jsonb, on_finish_kind => 'after')",
            json.dumps([{"n": i} for i in range(20)]),
        )
        for _ in range(10)
    ]
    for _ in range(3):
        start(
            "--handler", "test=daemon_handlers:record", "--handler", "after=daemon_handlers:after",
            "--concurrency", "8", *FAST,
        )  # fmt: skip

    async def follow_ups_done() -> bool:
        return await db.fetchval(
            "SELECT count(*) = 10 FROM chunkd.sync_jobs WHERE kind = 'after' "
            "AND finished_at IS NOT NULL"
        )

    await wait_until(follow_ups_done, timeout_s=60, what="10 follow-up jobs")
    runs = await db.fetch(
        "SELECT q.result->>'of' AS of, count(*) AS n FROM public.test_executions e "
        "JOIN chunkd.chunk_processing_queue q ON q.id = e.queue_id "
        "JOIN chunkd.sync_jobs j ON j.id = q.parent_sync_job_id "
        "WHERE j.kind = 'after' GROUP BY 1"
    )
    assert sorted(r["of"] for r in runs) == sorted(str(j) for j in jobs)
    assert {r["n"] for r in runs} == {1}
