"""The event loop's handler of errors nobody awaited, for ``chunkd run``.

asyncpg returns a pool connection inside ``asyncio.shield`` (``Pool.release``), so when a task
is cancelled in the middle of a query (the stop, while the database does not answer) the
release goes on in a task of its own; if resetting the connection then fails, asyncpg drops
the connection, and the failure is an exception no one retrieves. asyncio's default handler
would print it with a traceback. Here that one case is one debug line: nothing is lost (the
connection is closed, the chunk's lease still holds it). Everything else keeps the default
handling (a traceback there is a bug to see).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from chunkd.db import DATABASE_ERRORS

log = structlog.get_logger("chunkd.runtime")

# asyncpg's pool: the coroutine that resets and returns one connection (asyncpg/pool.py).
_POOL_RELEASE = "PoolConnectionHolder.release"


def install() -> None:
    """Sets the running loop's exception handler (call from within the loop)."""
    asyncio.get_running_loop().set_exception_handler(_handle)


def _handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    future = context.get("future")
    coro = future.get_coro() if isinstance(future, asyncio.Task) else None
    if isinstance(exc, DATABASE_ERRORS) and getattr(coro, "__qualname__", "") == _POOL_RELEASE:
        log.debug("pool.release_failed", error=str(exc) or type(exc).__name__)
        return
    loop.default_exception_handler(context)
