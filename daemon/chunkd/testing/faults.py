"""Failure simulators: a delivery of one chunk that goes wrong as it can in production, then
the redelivery the at-least-once contract promises, so a test can check that the handler is
idempotent (its effects the same as after one clean run).

- :func:`run_twice`: the handler finishes, but its completion never reaches the database (the
  worker died, the connection broke): the lease runs out, the reaper returns the chunk, and
  it runs again, with the same ``idempotency_key``.
- :func:`lose_lease`: the lease is lost mid-handler (the database out of reach for a whole
  lease): the handler is cancelled as the daemon cancels it (``CancelledError`` at its
  ``await``), the chunk is reaped and runs again.
- :func:`kill_mid_chunk` (:mod:`chunkd.testing.killing`): the process running the handler is
  killed (SIGKILL) mid-handler: no ``finally`` runs, its open transactions roll back; the
  chunk is reaped and runs again.

Each takes the next runnable chunk of the app's kinds (or of ``kind``), uses the daemon's
statements throughout (the claim, the reaper's ``reap_expired``, the fenced outcomes) and
returns a :class:`Redelivery`. A job whose ``max_attempts`` the first delivery used up fails
the chunk for good ("lease expired") and has no second delivery, as in production.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from chunkd.app import App
from chunkd.db import ClaimedRow
from chunkd.runtime.invoke import chunk_of
from chunkd.testing.running import Run, Runner, runner

__all__ = ["Redelivery", "SimulationError", "Trigger", "kinds_of", "lose_lease", "run_twice"]

# When a simulated fault strikes: seconds after the handler started, an asyncio.Event being
# set, or a condition (a function, async or not, returning True) checked every 10 ms.
Trigger: TypeAlias = float | asyncio.Event | Callable[[], bool | Awaitable[bool]]
# A lease that has run out by the time the claim returns: the reaper takes the chunk back
# whenever the simulator calls it, and not before (nothing else reaps in a test).
SPENT_LEASE_S = 0.001
POLL_S = 0.01
DEADLINE_S = 60.0


class SimulationError(AssertionError):
    """The fault could not be simulated as asked: no runnable chunk, the handler finished
    before the fault struck, the app cannot be found in a child process. The message says
    which."""


@dataclass(frozen=True)
class Redelivery:
    """A chunk's two deliveries: ``first`` went wrong on purpose (``outcome`` ``lost``,
    ``cancelled`` or ``killed``; a handler that went on after its cancellation and returned:
    ``fenced``), ``second`` is the redelivery as written (None: the first used the job's last
    attempt, so the chunk failed for good)."""

    first: Run
    second: Run | None

    @property
    def runs(self) -> list[Run]:
        return [self.first] if self.second is None else [self.first, self.second]


async def claim_first(run: Runner, kind: str | None) -> ClaimedRow:
    """The next runnable chunk, claimed with a lease that has run out already."""
    row, wait_s = await run.claim(lease_s=SPENT_LEASE_S)
    if row is None and await run.fast_forward() > 0:
        row, wait_s = await run.claim(lease_s=SPENT_LEASE_S)
    if row is None:
        which = f"of kind {kind!r}" if kind else f"of kinds {', '.join(run.kinds)}"
        why = f" (a rate limit holds them for {wait_s:g}s)" if wait_s else ""
        raise SimulationError(f"no runnable chunk {which}{why}: enqueue a job first")
    return row


async def redeliver(run: Runner, app: App, first: ClaimedRow) -> Run | None:
    """The reaper returns ``first`` (its lease ran out); then it is claimed again, as the
    next delivery, and run to its written outcome. None: it failed for good instead."""
    reaped = await run.queue.reap_expired()
    mine = [r for r in reaped if r["queue_id"] == first.queue_id]
    if not mine:
        raise SimulationError(f"chunk {first.queue_id} was not reaped: its lease is not ours")
    if mine[0]["final"]:
        return None
    passed: list[ClaimedRow] = []
    try:
        for _ in range(10_000):
            row, _wait = await run.claim()
            if row is None:
                break
            if row.queue_id == first.queue_id:
                return await run.deliver(app.handlers()[row.kind], row)
            passed.append(row)
    finally:
        await run.release(passed)
    raise SimulationError(f"chunk {first.queue_id} was reaped but could not be claimed again")


async def run_twice(
    app: App, dsn: str, *, kind: str | None = None, chunk_timeout_s: float = 300.0
) -> Redelivery:
    """Runs the next chunk twice: the first run's outcome is lost (never written), the second,
    a redelivery with the same ``idempotency_key`` and the next attempt, is written. Whatever
    the handler does outside this database it has then done twice.

    Raises:
        SimulationError: no runnable chunk.
    """
    async with runner(dsn, kinds_of(app, kind), chunk_timeout_s) as run:
        row = await claim_first(run, kind)
        chunk = chunk_of(row)
        called = await run.call(app.handlers()[row.kind], chunk)
        first = Run(chunk, "lost", _result(called.outcome.result_json), called.outcome.error,
                    called.raised)  # fmt: skip
        return Redelivery(first, await redeliver(run, app, row))


async def lose_lease(
    app: App,
    dsn: str,
    *,
    at: Trigger,
    kind: str | None = None,
    chunk_timeout_s: float = 300.0,
) -> Redelivery:
    """Runs the next chunk until ``at``, then loses its lease: the handler is cancelled as the
    daemon cancels it (``asyncio.CancelledError`` raised at its current ``await``; a plain
    function's thread runs on), the reaper returns the chunk and it runs again.

    Args:
        at: when the lease is lost: seconds after the handler started, an
            :class:`asyncio.Event` (set by a test double the handler calls, say), or a
            function (async or not) that returns True when it is time, checked every 10 ms.

    Raises:
        SimulationError: no runnable chunk; the handler finished before ``at``.
    """
    async with runner(dsn, kinds_of(app, kind), chunk_timeout_s) as run:
        row = await claim_first(run, kind)
        chunk = chunk_of(row)
        task = run.start(app.handlers()[row.kind], chunk)
        await wait_for_trigger(at, task.done, "the handler returned")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=DEADLINE_S)
        if not done:
            raise SimulationError(f"the handler went on {DEADLINE_S:g}s after its cancellation")
        if task.cancelled():
            return Redelivery(Run(chunk, "cancelled"), await redeliver(run, app, row))
        called = task.result()
        # It went on after the cancellation and returned (or raised): the chunk is reaped by
        # then, so whatever it reports is refused.
        second = await redeliver(run, app, row)
        outcome, error = await run.record(row, called.outcome)
        first = Run(chunk, outcome, _result(called.outcome.result_json), error, called.raised)
        return Redelivery(first, second)


async def wait_for_trigger(at: Trigger, finished: Callable[[], bool], what: str) -> None:
    """Returns when ``at`` strikes; raises SimulationError if ``finished()`` comes first."""
    started = time.monotonic()
    deadline = started + DEADLINE_S
    while True:
        if isinstance(at, asyncio.Event):
            struck = at.is_set()
        elif callable(at):
            answer = at()
            struck = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        else:
            struck = time.monotonic() - started >= float(at)
        if struck:
            return
        if finished():
            raise SimulationError(f"{what} before the fault struck (at={at!r})")
        if time.monotonic() > deadline:
            raise SimulationError(f"the fault never struck (at={at!r}) in {DEADLINE_S:g}s")
        await asyncio.sleep(POLL_S)


def kinds_of(app: App, kind: str | None) -> list[str]:
    """``[kind]``, or every kind of the app; LookupError for a kind it does not handle."""
    if kind is None:
        return app.kinds
    app.registered(kind)  # LookupError for a kind the app does not handle
    return [kind]


def _result(result_json: str | None) -> Any:
    from chunkd.chunk import loads_json

    return None if result_json is None else loads_json(result_json)
