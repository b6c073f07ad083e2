"""Noticing that the event loop stalled, and saying for how long.

Everything in ``chunkd run`` shares one event loop, so a handler that runs blocking code in an
``async def`` (``time.sleep``, a blocking client, a long computation) stops everything else:
heartbeats, other handlers, ``--chunk-timeout`` itself. A process stopped with ``SIGSTOP`` (or
a host that froze) looks the same from inside. A task that asks to wake every ``tick_s``
measures how late it woke; a stall over ``threshold_s`` is logged once, with its length, when
the loop runs again. By then the lease timers are overdue too and fire at once
(:mod:`chunkd.runtime.inflight`). Each wake-up also calls ``on_tick``: the ``/healthz`` probe
(:mod:`chunkd.observability.probes`) sees a stall while it lasts, from another thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

__all__ = ["StallDetector"]

log = structlog.get_logger("chunkd.runtime.stall")

TICK_S = 0.25
THRESHOLD_S = 1.0


class StallDetector:
    def __init__(
        self,
        *,
        worker_id: str,
        tick_s: float = TICK_S,
        threshold_s: float = THRESHOLD_S,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self._worker_id = worker_id
        self.tick_s = tick_s
        self.threshold_s = threshold_s
        self.stalls = 0
        self._on_tick = on_tick

    def check(self, late_s: float) -> bool:
        """Logs a stall when the loop woke ``late_s`` seconds late; True when it did."""
        if late_s < self.threshold_s:
            return False
        self.stalls += 1
        log.warning(
            "event_loop.stalled",
            stalled_s=round(late_s, 3),
            worker_id=self._worker_id,
            note="blocking code in an async handler, or the process was stopped; "
            "leases that ran out meanwhile are given up",
        )
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self._on_tick()
            self.check(loop.time() - due)
