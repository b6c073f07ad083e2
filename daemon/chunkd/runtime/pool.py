"""The supervisor's pool of long-lived worker tasks, one per slot, fed from the claimer.

A worker takes the next ready chunk itself as soon as its handler returns, in the same step of
the event loop: no task is created per chunk and no loop turn passes between two chunks while
the claimer keeps chunks ready. Only an idle worker waits, on a future of its own that the
claimer resolves when chunks arrive.

A chunk's handler runs inside its worker's task, so the daemon cancels it by cancelling that
task (:mod:`chunkd.runtime.inflight`: a lost lease, the chunk timeout), and only while the
handler runs (the claim forgets the task when the handler returns, before the worker takes
another chunk). The worker takes such a cancellation back once the chunk is over
(``Task.uncancel``) and goes on with the next chunk; only :meth:`WorkerPool.stop` ends the
workers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import structlog

from chunkd.db import ClaimedRow
from chunkd.runtime.inflight import InFlight
from chunkd.runtime.worker import Worker

__all__ = ["WorkerPool"]

log = structlog.get_logger("chunkd.runtime.pool")


class WorkerPool:
    def __init__(
        self,
        worker: Worker,
        inflight: InFlight,
        take: Callable[[], ClaimedRow | None],
        slot_freed: Callable[[], None],
    ) -> None:
        """``take``: the next ready chunk to start (the claimer's), or None; ``slot_freed``:
        told when a handler was cancelled (its slot is free for another claim; a handler that
        returns tells the claimer itself, with its duration)."""
        self._worker = worker
        self._inflight = inflight
        self._take = take
        self._slot_freed = slot_freed
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: deque[asyncio.Future[None]] = deque()
        self._stopping = False
        self._all_idle = asyncio.Event()

    def start(self) -> None:
        """Starts one worker per slot (``--concurrency``)."""
        self._tasks = [
            asyncio.create_task(self._run(), name=f"worker-{n}")
            for n in range(self._inflight.concurrency)
        ]

    def wake(self, chunks: int) -> None:
        """Chunks are ready: wake up to that many idle workers."""
        while chunks > 0 and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                chunks -= 1

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no handler runs (a graceful stop gives them ``timeout_s`` seconds);
        True if none runs."""
        if self._inflight.running == 0:
            return True
        self._all_idle.clear()
        try:
            await asyncio.wait_for(self._all_idle.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float) -> None:
        """Ends the workers, cancelling the handlers still running; waits ``timeout_s`` at most
        for them to end."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)

    async def _run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            row = self._take()
            if row is None:
                await self._wait_for_work(task)
                continue
            self._inflight.started(row, task)
            try:
                await self._worker.run(row)
            except asyncio.CancelledError:
                if self._stopping:
                    raise
                # The daemon's cancellation of this chunk alone (its lease is lost): the
                # worker goes on with the next one, and the claimer may fill the slot.
                while task.uncancel() > 0:
                    pass
                self._slot_freed()
            finally:
                # However the chunk ended: the slot frees, and a chunk without an outcome is no
                # longer renewed.
                self._inflight.task_ended(row)
                if self._inflight.running == 0:
                    self._all_idle.set()

    async def _wait_for_work(self, task: asyncio.Task[None]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if self._stopping:
                raise
            while task.uncancel() > 0:  # not ours to act on: no chunk runs here
                pass
        finally:
            if not waiter.done():
                waiter.cancel()
