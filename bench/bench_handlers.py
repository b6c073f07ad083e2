"""Handlers for benchmark daemons run as subprocesses (PYTHONPATH=bench)."""

from __future__ import annotations

import asyncio

from chunkd import Chunk


async def noop(chunk: Chunk) -> None:
    return None


async def sleep10(chunk: Chunk) -> None:
    await asyncio.sleep(0.010)


async def sleep_payload(chunk: Chunk) -> None:
    """Sleeps the chunk payload's ``sleep_s`` (bench/flow_bench.py)."""
    await asyncio.sleep(float(chunk.payload["sleep_s"]))


async def sleep20(chunk: Chunk) -> None:
    """The Python side of bench/io_bench.py: as long as its HTTP endpoint takes to answer."""
    await asyncio.sleep(0.020)


async def sleep1(chunk: Chunk) -> None:
    """The soak's short handler (bench/soak.py)."""
    await asyncio.sleep(0.001)
