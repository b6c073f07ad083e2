"""The handler the adapter's ``chunkd run`` child runs: ``harness=chunkd_harness_handler:handle``.

Each chunk's payload carries ``t_us``, the producer's wall clock (µs since the epoch) taken
right before the enqueue call. The handler takes its pickup latency first thing, does
``JOB_WORK_MS`` of synthetic work (an ``asyncio.sleep``), and then reports the latency to the
adapter as one 8-byte datagram (a float, ms) on the unix socket named by
``CHUNKD_HARNESS_REPORT``: one datagram is one completed chunk. Producer and daemon run on
the same host, so the two clocks are the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time

from chunkd import Chunk

WORK_S = int(os.environ.get("JOB_WORK_MS", "1")) / 1000.0
_report: socket.socket | None = None


def _socket() -> socket.socket:
    global _report
    if _report is None:
        _report = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _report.connect(os.environ["CHUNKD_HARNESS_REPORT"])
    return _report


async def handle(chunk: Chunk) -> None:
    """Latency, synthetic work, report; a vanished adapter is not the chunk's failure."""
    latency_ms = max(0.0, time.time() * 1000.0 - int(chunk.payload["t_us"]) / 1000.0)
    if WORK_S:
        await asyncio.sleep(WORK_S)
    with contextlib.suppress(OSError):
        _socket().send(struct.pack("d", latency_ms))
