"""Handlers the daemon tests run in real ``chunkd run`` subprocesses (PYTHONPATH=tests).

``record`` writes every execution (chunk, attempt, worker pid, start, end) into the test
database, so a test can prove each chunk ran exactly once, in order, without overlap. What it
does is steered by the chunk payload.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

from chunkd import Chunk, Continue, PermanentError, RetryLater

_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()

EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS public.test_executions (
    id         bigserial PRIMARY KEY,
    chunk_id   uuid NOT NULL,
    queue_id   uuid NOT NULL,
    job_id     uuid NOT NULL,
    seq        int NOT NULL,
    attempt    int NOT NULL,
    pid        int NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def _get_pool() -> asyncpg.Pool:
    global _pool
    async with _lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["CHUNKD_DSN"], min_size=1, max_size=4)
    return _pool


async def record(chunk: Chunk) -> dict[str, object]:
    pool = await _get_pool()
    started = await pool.fetchval("SELECT clock_timestamp()")
    payload = chunk.payload if isinstance(chunk.payload, dict) else {}
    if payload.get("sleep_s"):
        await asyncio.sleep(float(payload["sleep_s"]))
    await pool.execute(
        "INSERT INTO public.test_executions"
        " (chunk_id, queue_id, job_id, seq, attempt, pid, started_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        chunk.chunk_id, chunk.queue_id, chunk.sync_job_id, chunk.seq, chunk.attempt,
        os.getpid(), started,
    )  # fmt: skip
    if payload.get("fail") == "always":
        raise RuntimeError(f"planned failure on attempt {chunk.attempt}")
    if payload.get("fail") == "permanent":
        raise PermanentError("planned permanent failure")
    if payload.get("fail") == "retry_later" and await _runs(chunk) == 1:
        # (By runs, not attempts: a RetryLater spends no attempt.)
        raise RetryLater(float(payload.get("delay_s", 1)))
    if "snooze" in payload:
        # A rate-limited API: RetryLater(delays[k - 1]) on the chunk's k-th run while there are
        # delays left; "always" with delay_s: on every run.
        runs = await _runs(chunk)
        delays = payload["snooze"]
        if delays == "always" or runs <= len(delays):
            delay = payload["delay_s"] if delays == "always" else delays[runs - 1]
            raise RetryLater(float(delay), f"rate limited on run {runs}")
    if payload.get("fail") == "first_run" and await _runs(chunk) == 1:
        # Fails for good the first time the chunk ever runs; an operator's retry then succeeds.
        raise PermanentError("planned failure of the first run")
    if payload.get("fail") == "hang" and chunk.attempt == 1:
        await asyncio.sleep(3600)
    if payload.get("fail_until", 0) >= chunk.attempt:
        raise RuntimeError(f"transient failure on attempt {chunk.attempt}")
    if payload.get("result") == "nul":
        return {"text": "NUL \u0000 inside"}  # valid JSON that jsonb refuses
    return {"seq": chunk.seq, "attempt": chunk.attempt}


async def _runs(chunk: Chunk) -> int:
    """How many times this chunk has run (recorded), this run included."""
    pool = await _get_pool()
    runs: int = await pool.fetchval(
        "SELECT count(*) FROM public.test_executions WHERE chunk_id = $1", chunk.chunk_id
    )
    return runs


async def chain(chunk: Chunk) -> Continue:
    """A continuation chain: page n records its execution and appends page n + 1 until
    ``last``; the result names the page, so a test can match results to seqs. The page
    ``slow_page`` takes 2 s (a window to kill its daemon in)."""
    page, last = chunk.payload["page"], chunk.payload["last"]
    if page == chunk.payload.get("slow_page"):
        await asyncio.sleep(2)
    await record(chunk)
    following = [{**chunk.payload, "page": page + 1}] if page < last else []
    return Continue(result={"page": page}, chunks=following)


async def after(chunk: Chunk) -> dict[str, object]:
    """An on_finish follow-up: records that it ran."""
    await record(chunk)
    return {"of": chunk.payload["sync_job_id"], "status": chunk.payload["overall_status"]}


async def nap(chunk: Chunk) -> None:
    """Sleeps ``sleep_s`` (default 10 ms) and returns: a steady stream of claims that writes
    nothing of its own."""
    payload = chunk.payload if isinstance(chunk.payload, dict) else {}
    await asyncio.sleep(float(payload.get("sleep_s", 0.01)))


async def wrapping(chunk: Chunk) -> dict[str, object]:
    """Reads the payload and wraps whatever goes wrong in an error of its own, as handlers
    often do: a payload that can never be decoded must still fail at once, not be retried."""
    try:
        return {"keys": len(chunk.payload) + len(chunk.job_payload)}
    except Exception as exc:
        raise RuntimeError(f"could not read chunk {chunk.seq}") from exc


def _open_mailbox(token: str) -> None:
    raise ValueError("no mailbox \udcff here")  # a lone surrogate: the log line must stay JSON


async def chained(chunk: Chunk) -> None:
    """Fails with an exception raised from another (a chained cause), in frames whose locals
    hold the payload's ``token``: a log line may show the traceback, never a local's value."""
    token = chunk.payload["token"]
    try:
        _open_mailbox(token)
    except ValueError as exc:
        raise RuntimeError("handler failed") from exc
