"""Handlers for benchmark daemons run as subprocesses (PYTHONPATH=bench)."""

from __future__ import annotations

import asyncio

from chunkd import Chunk


async def noop(chunk: Chunk) -> None:
    return None


async def sleep10(chunk: Chunk) -> None:
    await asyncio.sleep(0.010)
