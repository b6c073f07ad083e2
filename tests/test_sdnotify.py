"""The sd_notify protocol for real: the test plays systemd's side of ``NOTIFY_SOCKET``.

A real ``chunkd run`` gets a unix datagram socket bound by the test and ``WATCHDOG_USEC`` of
one second, exactly what systemd hands a ``Type=notify`` service with ``WatchdogSec=1``.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from daemon_handlers import EXECUTIONS_DDL
from daemon_helpers import Daemon, wait_until
from sql_helpers import create_job, status_counts

RECORD = "test=daemon_handlers:record"
WATCHDOG_USEC = 1_000_000


class FakeSystemd:
    """Receives notify datagrams in the background, each kept with its arrival time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def with_field(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    async def first(self, key: str, value: str | None = None, timeout_s: float = 15.0) -> float:
        async def seen() -> float | None:
            for t, m in self.with_field(key):
                if value is None or m[key] == value:
                    return t
            return None

        return await wait_until(seen, timeout_s=timeout_s, what=f"{key}={value or '*'}")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory of our own: sun_path is limited to 108 bytes, pytest's tmp_path is long.
    with tempfile.TemporaryDirectory(prefix="chunkd-notify-") as tmp:
        path = str(Path(tmp) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        try:
            yield sock, path
        finally:
            sock.close()


async def test_ready_status_watchdog_and_stopping(
    conn: asyncpg.Connection, database, tmp_path, notify_socket
) -> None:
    await conn.execute(EXECUTIONS_DDL)
    sock, path = notify_socket
    systemd = FakeSystemd(sock)
    # A slow safety poll: after READY only a NOTIFY on the LISTEN connection can wake a claim.
    daemon = Daemon(
        database.dsn,
        tmp_path / "daemon.log",
        "--handler", RECORD, "--concurrency", "4", "--poll-interval", "10m",
        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )  # fmt: skip
    try:
        await systemd.first("READY", "1")
        ready = systemd.with_field("READY")
        assert len(ready) == 1 and ready[0][1]["STATUS"] == "listening; 0/4 in flight"
        started = await daemon.wait_for_event("daemon.ready")
        assert started["worker_id"]

        # READY promised a working listener: a new job's NOTIFY alone gets it claimed.
        job = await create_job(conn, [{"sleep_s": 1.5}])
        status_during = await systemd.first("STATUS", "1/4 in flight", timeout_s=10)

        async def completed() -> bool:
            return await status_counts(conn, job) == {"completed": 1}

        await wait_until(completed, timeout_s=10, what="the chunk woken by NOTIFY to complete")
        status_after = await wait_until(
            lambda: _status_after(systemd, status_during, "0/4 in flight"),
            timeout_s=5,
            what="STATUS back to 0/4 in flight",
        )
        assert status_after > status_during

        # Watchdog pings at half of WATCHDOG_USEC, from the event loop, all along (also while
        # a handler runs): 3 within 2 s of READY, and never a gap systemd would punish.
        ready_at = ready[0][0]

        async def pings_since_ready() -> list[float] | None:
            times = [t for t, _ in systemd.with_field("WATCHDOG") if t >= ready_at]
            return times if len(times) >= 4 else None

        pings = await wait_until(pings_since_ready, timeout_s=5, what="4 watchdog pings")
        assert pings[2] - ready_at < 2.0, f"3 pings within 2 s of READY: {pings}"
        all_pings = [t for t, _ in systemd.with_field("WATCHDOG")]
        gaps = [b - a for a, b in itertools.pairwise(all_pings)]
        assert all(m["WATCHDOG"] == "1" for _, m in systemd.with_field("WATCHDOG"))
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"a gap would have tripped the watchdog: {gaps}"

        daemon.signal(signal.SIGTERM)
        await systemd.first("STOPPING", "1", timeout_s=10)
        assert await daemon.wait() == 0
        stopping = systemd.with_field("STOPPING")
        assert stopping[0][1]["STATUS"].startswith("stopping")
    finally:
        daemon.kill()
        await systemd.close()


async def _status_after(systemd: FakeSystemd, since: float, status: str) -> float | None:
    for t, m in systemd.with_field("STATUS"):
        if t > since and m["STATUS"] == status:
            return t
    return None
