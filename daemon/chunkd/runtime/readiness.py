"""The readiness checks behind ``/readyz``, run on the event loop every :data:`INTERVAL_S`.

Three questions, each answered in the body (:mod:`chunkd.observability.probes`):

- ``database``: does it answer? (a pooled connection and the schema-version statement, within
  :data:`TIMEOUT_S`);
- ``schema``: is it the version this chunkd knows? (behind: someone must run ``chunkd
  migrate``; ahead: this chunkd is older than the schema);
- ``listener``: is the LISTEN connection up, or is the poll fallback active (through a
  transaction pooler)? While it reconnects, new work is found only by the safety poll.

Cheap on purpose: two statements per round, so any number of probes costs the database the
same.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chunkd.db import DATABASE_ERRORS, Listener, Queue
from chunkd.errors import ChunkdError
from chunkd.observability.probes import Probes
from chunkd.runtime.health import first_line

__all__ = ["INTERVAL_S", "STALE_AFTER_S", "TIMEOUT_S", "ReadinessChecks"]

INTERVAL_S = 2.0
TIMEOUT_S = 2.0
# A round older than this no longer counts (the loop should have run two more by then).
STALE_AFTER_S = 2 * INTERVAL_S + TIMEOUT_S


class ReadinessChecks:
    def __init__(
        self,
        queue: Queue,
        listener: Listener,
        probes: Probes,
        *,
        interval_s: float = INTERVAL_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._queue = queue
        self._listener = listener
        self._probes = probes
        self._interval_s = interval_s
        self._timeout_s = timeout_s

    async def check_once(self) -> dict[str, dict[str, Any]]:
        """One round: publishes the checks to the probes and returns them."""
        checks = {**await self._database_and_schema(), "listener": self._listener_check()}
        self._probes.readiness(checks)
        return checks

    async def _database_and_schema(self) -> dict[str, dict[str, Any]]:
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: wait_for runs the query in a task of its own, and
            # when the stop cancels this round while asyncpg turns that cancel into its own
            # TimeoutError, the task's exception is never retrieved and asyncio logs a traceback.
            async with asyncio.timeout(self._timeout_s):
                state = await self._queue.schema_state(self._timeout_s)
        except (ChunkdError, *DATABASE_ERRORS) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc  # the stop, not the database's answer
            if isinstance(exc, TimeoutError):
                error = f"no answer within {self._timeout_s:g} s"
            elif isinstance(exc, OSError):  # a new pool connection refused: no DSN in it
                error = f"cannot connect: {first_line(exc)}"
            else:
                error = first_line(exc)
            return {
                "database": {"ok": False, "error": error},
                "schema": {"ok": False, "error": "not checked: the database did not answer"},
            }
        database = {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 1)}
        schema: dict[str, Any] = {
            "ok": state.current,
            "applied": max(state.applied, default=None),
            "expected": max(state.known),
        }
        if state.unknown:
            schema["error"] = f"schema has versions {list(state.unknown)} unknown to this chunkd"
        elif state.pending:
            schema["error"] = f"schema is behind: run chunkd migrate ({list(state.pending)})"
        return {"database": database, "schema": schema}

    def _listener_check(self) -> dict[str, Any]:
        if self._listener.polling:
            return {"ok": True, "mode": "poll", "note": "no LISTEN through a transaction pooler"}
        if self._listener.listening:
            return {"ok": True, "mode": "listen"}
        return {
            "ok": False,
            "mode": "disconnected",
            "error": "the LISTEN connection is down (reconnecting)",
        }

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)
