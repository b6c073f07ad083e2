"""Handlers for the tracing tests (``--handler traced=trace_handlers:flaky``)."""

from __future__ import annotations

from chunkd import Chunk
from chunkd.observability.tracing import current_traceparent


async def flaky(chunk: Chunk) -> dict[str, object]:
    """Fails while ``fail_until`` (in the payload) is at least the attempt, then succeeds
    with the ``traceparent`` of the span current while it ran (None: none)."""
    if chunk.payload.get("fail_until", 0) >= chunk.attempt:
        raise RuntimeError(f"seq {chunk.seq} fails on attempt {chunk.attempt}")
    return {"seq": chunk.seq, "traceparent": current_traceparent()}


async def napping(chunk: Chunk) -> dict[str, object]:
    """Sleeps ``sleep_s`` (in the payload), then succeeds."""
    import asyncio

    await asyncio.sleep(float(chunk.payload.get("sleep_s", 0)))
    return {"seq": chunk.seq}


_started: dict[object, int] = {}
_finished: dict[object, int] = {}


async def _until(counts: dict[object, int], job: object, goal: int, what: str) -> None:
    import asyncio

    for _ in range(2000):
        if counts.get(job, 0) >= goal:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{what} not reached in 20 s")


async def rendezvous(chunk: Chunk) -> dict[str, object]:
    """Per job: a chunk with ``meet`` N in its payload waits until N such chunks have started
    (with one slot per daemon, N daemons hold one each); one with ``after`` N waits until N
    chunks without it have finished. Either waits at most 20 s, then fails."""
    job, payload = chunk.sync_job_id, chunk.payload
    if "meet" in payload:
        _started[job] = _started.get(job, 0) + 1
        await _until(_started, job, int(payload["meet"]), f"seq {chunk.seq}: meeting")
    if "after" in payload:
        await _until(_finished, job, int(payload["after"]), f"seq {chunk.seq}: the others")
    else:
        _finished[job] = _finished.get(job, 0) + 1
    return {"seq": chunk.seq}
