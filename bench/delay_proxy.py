"""A TCP proxy that holds every chunk of bytes for a fixed delay, in both directions.

Stands in for the network between a daemon on another host and PostgreSQL where the kernel
has no netem qdisc (``tc qdisc add dev lo root netem delay 1ms`` is the real thing where it
exists). Each chunk read from one side is written to the other side ``delay`` seconds after
it was read: order is kept, and the delay is not serialised, so a pipelined stream of chunks
arrives each ~1 ms late, not 1 ms apart (as on a wire with 1 ms of propagation delay and no
bandwidth limit).

Run it as its own process, so its CPU shows apart from the daemon's::

    python bench/delay_proxy.py --upstream /tmp/sock/.s.PGSQL.5432 --delay-ms 1
    python bench/delay_proxy.py --self-check    # what it costs, and that it delays right

It prints the port it listens on (127.0.0.1) as one line on stdout once it accepts
connections, and runs until SIGTERM/SIGINT. ``--upstream`` is a unix socket path or
``HOST:PORT``. Buffered asyncio protocols on uvloop, reads of up to 256 KiB, one callback
per chunk read and one timer wake-up per burst; the delays run on a Linux timerfd, since
uvloop's own timers round to whole milliseconds (``--loop select`` is the slower fallback on
asyncio's own loop).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import heapq
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from selectors import SelectSelector
from typing import cast

READ_SIZE = 256 * 1024
# Pause reading a side while the other side has this much unwritten (delayed + buffered).
HIGH_WATER = 4 * 1024 * 1024


Schedule = Callable[[float, Callable[[], None]], None]
"""Call the callback at a time.monotonic() instant, with sub-millisecond precision."""


class _TimerFd:
    """Precise timers for uvloop, whose own round to whole milliseconds: one Linux timerfd
    (CLOCK_MONOTONIC, absolute expiry) watched by the loop, armed for the earliest of a heap
    of due callbacks."""

    _CLOCK_MONOTONIC, _TFD_NONBLOCK_CLOEXEC, _TFD_TIMER_ABSTIME = 1, 0o4000 | 0o2000000, 1

    class _Spec(ctypes.Structure):
        _fields_ = [(name, ctypes.c_long) for name in ("i_sec", "i_nsec", "v_sec", "v_nsec")]

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, self._TFD_NONBLOCK_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._armed = math.inf
        self._spec = self._Spec()
        loop.add_reader(self._fd, self._fired)

    def schedule(self, due: float, callback: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, callback))
        if due < self._armed:
            self._arm(due)

    def _arm(self, due: float) -> None:
        self._armed = due
        self._spec.v_sec, frac = int(due), due - int(due)
        self._spec.v_nsec = max(1, int(frac * 1e9))  # all zero would disarm
        self._libc.timerfd_settime(
            self._fd, self._TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None
        )

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        self._armed = math.inf
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()
        if heap:
            self._arm(heap[0][0])


class _Direction:
    """One direction of one connection: chunks held until due, then written in order."""

    def __init__(self, schedule: Schedule, delay_s: float) -> None:
        self._schedule = schedule
        self._delay_s = delay_s
        self._held: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._armed = False
        self._held_bytes = 0
        self._paused = False
        self.source: asyncio.Transport | None = None
        self.target: asyncio.Transport | None = None

    def push(self, data: bytes | None) -> None:
        """``data`` was read now; None: the source is gone, close the target once what is
        held before it has been written."""
        due = time.monotonic() + self._delay_s
        self._held.append((due, data))
        if data:
            self._held_bytes += len(data)
            if self._held_bytes > HIGH_WATER and self.source is not None and not self._paused:
                self._paused = True
                self.source.pause_reading()
        if not self._armed and self.target is not None:
            self._armed = True
            self._schedule(due, self._release)

    def start(self, target: asyncio.Transport) -> None:
        """The target is connected: deliver what is held (none yet, the source was paused)."""
        self.target = target
        if self._held and not self._armed:
            self._armed = True
            self._schedule(self._held[0][0], self._release)

    def _release(self) -> None:
        now = time.monotonic()
        target = self.target
        assert target is not None
        held = self._held
        while held and held[0][0] <= now:
            _, data = held.popleft()
            if data is None:
                target.close()  # after its buffered writes
            elif not target.is_closing():
                self._held_bytes -= len(data)
                target.write(data)
        if held:
            self._schedule(held[0][0], self._release)
        else:
            self._armed = False
        if self._paused and self._held_bytes <= HIGH_WATER and self.source is not None:
            self._paused = False
            with contextlib.suppress(RuntimeError):
                self.source.resume_reading()


class _Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection; what it reads goes to ``outgoing``."""

    def __init__(self, outgoing: _Direction) -> None:
        self._outgoing = outgoing
        self._buffer = bytearray(READ_SIZE)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._outgoing.source = self.transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._outgoing.push(bytes(memoryview(self._buffer)[:nbytes]))

    def eof_received(self) -> bool:
        return False  # close this side; connection_lost passes the close on, delayed

    def connection_lost(self, exc: Exception | None) -> None:
        self._outgoing.source = None
        self._outgoing.push(None)


class _ClientSide(_Side):
    """The accepted socket: reads nothing until its upstream connection is up."""

    def __init__(self, outgoing: _Direction, on_made: Callable[[_Side], object]) -> None:
        super().__init__(outgoing)
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self._on_made(self)


class DelayProxy:
    """Listens on 127.0.0.1; every accepted connection gets its own upstream connection."""

    def __init__(self, upstream: str, delay_s: float, schedule: Schedule) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self._schedule = schedule
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, "127.0.0.1", 0, backlog=1024, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _accept(self) -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        to_server = _Direction(self._schedule, self.delay_s)
        to_client = _Direction(self._schedule, self.delay_s)

        def connect(client: _Side) -> None:
            task = loop.create_task(self._connect_upstream(client, to_server, to_client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return _ClientSide(to_server, connect)

    async def _connect_upstream(
        self, client: _Side, to_server: _Direction, to_client: _Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        assert client.transport is not None
        server = _Side(to_client)
        try:
            if self.upstream.startswith("/"):
                await loop.create_unix_connection(lambda: server, self.upstream)
            else:
                host, _, port = self.upstream.rpartition(":")
                await loop.create_connection(lambda: server, host, int(port))
        except OSError as exc:
            print(f"delay_proxy: upstream {self.upstream}: {exc}", file=sys.stderr)
            client.transport.close()
            return
        assert server.transport is not None
        to_server.start(server.transport)
        to_client.start(client.transport)
        if not client.transport.is_closing():
            client.transport.resume_reading()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _scheduler(loop_kind: str) -> Schedule:
    """How held chunks are released on the running loop (see ``main``)."""
    loop = asyncio.get_running_loop()
    if loop_kind == "uvloop":
        return _TimerFd(loop).schedule

    def call_at(due: float, callback: Callable[[], None]) -> None:
        loop.call_at(due, callback)  # this loop's clock is time.monotonic()

    return call_at


async def _serve(upstream: str, delay_s: float, loop_kind: str) -> None:
    proxy = DelayProxy(upstream, delay_s, _scheduler(loop_kind))
    port = await proxy.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()


async def _self_check(delay_ms: float, loop_kind: str, n: int = 2000) -> dict[str, object]:
    """Round trips to an echo server, direct and through a proxy process at ``delay_ms``
    each way; then 100 writes 0.2 ms apart through it: each should come back ~2x the delay
    after it was sent (not serialised) and in order."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await asyncio.create_subprocess_exec(
        *(sys.executable, __file__, "--upstream", f"127.0.0.1:{port}"),
        *("--delay-ms", str(delay_ms), "--loop", loop_kind),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proxy.stdout is not None
    proxy_port = int(await proxy.stdout.readline())

    async def round_trips(target: int) -> tuple[float, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", target)
        rtts = []
        for _ in range(n):
            sent = time.perf_counter()
            writer.write(b"x")
            await reader.readexactly(1)
            rtts.append((time.perf_counter() - sent) * 1000)
        writer.close()
        rtts.sort()
        return rtts[n // 2], rtts[int(n * 0.99)]

    def cpu_s() -> float:
        fields = open(f"/proc/{proxy.pid}/stat").read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    direct = await round_trips(port)
    cpu_before = cpu_s()
    proxied = await round_trips(proxy_port)
    cpu_us = (cpu_s() - cpu_before) / n * 1e6
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    sent_at: list[float] = []
    arrived: list[tuple[int, float]] = []

    async def read_back() -> None:
        buffer = b""
        while len(arrived) < 100:
            buffer += await reader.read(65536)
            while len(buffer) >= 4:
                arrived.append((int(buffer[:4]), time.perf_counter()))
                buffer = buffer[4:]

    reading = asyncio.create_task(read_back())
    for i in range(100):
        sent_at.append(time.perf_counter())
        writer.write(b"%04d" % i)
        await asyncio.sleep(0.0002)
    await reading
    writer.close()
    late = sorted((t - sent_at[i]) * 1000 for i, t in arrived)
    proxy.terminate()
    await proxy.wait()
    server.close()
    return {
        "delay_ms_each_way": delay_ms,
        "loop": loop_kind,
        "rtt_ms_direct_p50_p99": [round(x, 3) for x in direct],
        "rtt_ms_proxied_p50_p99": [round(x, 3) for x in proxied],
        "proxy_cpu_us_per_round_trip": round(cpu_us, 1),
        "pipelined_100_sent_over_ms": round((sent_at[-1] - sent_at[0]) * 1000, 1),
        "pipelined_late_ms_p50_max": [round(late[50], 3), round(late[-1], 3)],
        "pipelined_in_order": [i for i, _ in arrived] == list(range(100)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="unix socket path or HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=1.0, help="each way (default 1)")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "select"),
        default="uvloop",
        help="uvloop with a timerfd for the delays (default; Linux), or asyncio's own loop "
        "on select(2), whose timeout is in microseconds (epoll's and libuv's timers round to "
        "whole milliseconds, which would blur a 1 ms delay by up to 1 ms)",
    )
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="measure the proxy at 0 ms and at --delay-ms against an echo server; JSON lines",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if args.self_check:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(SelectSelector())) as r:
            for delay_ms in sorted({0.0, args.delay_ms}):
                print(json.dumps(r.run(_self_check(delay_ms, args.loop))), flush=True)
        return 0
    if not args.upstream:
        parser.error("--upstream is required")
    if args.loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = lambda: asyncio.SelectorEventLoop(SelectSelector())  # noqa: E731
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args.upstream, args.delay_ms / 1000.0, args.loop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
