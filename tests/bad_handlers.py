"""Handlers that misbehave on purpose, run by real ``chunkd run`` subprocesses (PYTHONPATH=tests)
in the bad-input and security tests: one bad chunk must only ever fail that chunk.

None of them touches the database, so they also run under a worker role holding nothing but
the documented grants.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from chunkd import Chunk

__all__ = [
    "blocks_loop",
    "echo",
    "hangs",
    "hides_timeout",
    "ignores_timeout",
    "non_json",
    "number_types",
    "raises",
    "slow_echo",
    "sys_exit",
]


async def echo(chunk: Chunk) -> dict[str, Any]:
    """Returns what it was given, so a test can check a hostile payload made the round trip."""
    return {"kind": chunk.kind, "payload": chunk.payload, "job_payload": chunk.job_payload}


async def number_types(chunk: Chunk) -> dict[str, Any]:
    """The Python type of each value of the payload (an object): what a handler is given."""
    return {key: type(value).__name__ for key, value in chunk.payload.items()}


async def slow_echo(chunk: Chunk) -> dict[str, Any]:
    """Takes ``payload["sleep_s"]`` seconds, then reports which process ran it."""
    payload = chunk.payload if isinstance(chunk.payload, dict) else {}
    await asyncio.sleep(float(payload.get("sleep_s", 0)))
    return {"pid": os.getpid(), "attempt": chunk.attempt}


async def blocks_loop(chunk: Chunk) -> dict[str, Any]:
    """Blocks the whole event loop for ``payload["block_s"]`` seconds with ``time.sleep`` in an
    ``async def``: the mistake ``/healthz`` and the stall detector exist to catch."""
    time.sleep(float(chunk.payload["block_s"]))  # noqa: ASYNC251 - on purpose
    return {"blocked_s": chunk.payload["block_s"]}


async def raises(chunk: Chunk) -> None:
    raise ValueError(f"bad chunk {chunk.seq}")


async def hangs(chunk: Chunk) -> None:
    await asyncio.sleep(3600)


async def hides_timeout(chunk: Chunk) -> None:
    """Hangs, and turns the timeout's cancellation into an error of its own (as HTTP clients
    do): still reported as the timeout it was."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise RuntimeError("connection aborted") from None


async def ignores_timeout(chunk: Chunk) -> dict[str, bool]:
    """Swallows the timeout's cancellation and finishes its work: the result stands."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.1)
    return {"finished": True}


async def non_json(chunk: Chunk) -> Any:
    return {"when": object(), "nan": float("nan")}


async def sys_exit(chunk: Chunk) -> None:
    sys.exit(3)


def pages(chunk: Chunk) -> Any:
    """A generator: not a handler (a spec naming one is refused at start-up)."""
    yield chunk.seq
