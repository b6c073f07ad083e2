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
