"""A keep-alive HTTP/1.1 endpoint that answers every request after a fixed delay.

The stand-in for an edge function in bench/http_clients.py and bench/io_bench.py. It runs in
its own process (so it does not share the measured client's event loop or GIL), on uvloop when
installed, and is a bare ``asyncio.Protocol``: no framework's per-request cost, so at 20 ms and
hundreds of connections the client, not this server, is what a run measures. Each request
(``Content-Length`` bodies only) gets ``200`` with ``{"ok":true}`` ``--delay-ms`` after its
last byte arrived; requests pipelined on one connection are answered in order.

    python bench/http_endpoint.py --delay-ms 20        # prints "PORT <n>" once listening

It stops on SIGTERM or SIGINT, and with ``--watch-stdin`` when its standard input (a pipe
from the parent) closes, so it never outlives a benchmark that died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

BODY = b'{"ok":true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024


class DelayedResponder(asyncio.Protocol):
    """Parses request heads and ``Content-Length`` bodies; answers each after the delay."""

    def __init__(self, delay_s: float, stats: dict[str, int]) -> None:
        self.delay_s = delay_s
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending = 0  # answers scheduled but not written yet (pipelining keeps order)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.stats["connections"] += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._refuse()
                return
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self._refuse()  # chunked request bodies are not needed by any client here
                    return
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.stats["requests"] += 1
            self.pending += 1
            asyncio.get_running_loop().call_later(self.delay_s, self._answer)

    def _answer(self) -> None:
        self.pending -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RESPONSE)

    def _refuse(self) -> None:
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(delay_s: float, host: str, port: int, watch_stdin: bool) -> None:
    loop = asyncio.get_running_loop()
    stats = {"connections": 0, "requests": 0}
    server = await loop.create_server(
        lambda: DelayedResponder(delay_s, stats), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin:
        # The parent keeps our stdin pipe open; EOF means it is gone: nothing outlives a run.
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            if not os.read(fd, 4096):
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, on_stdin)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()
    print(f"served {stats['requests']} requests on {stats['connections']} connections",
          file=sys.stderr)  # fmt: skip


def start(delay_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    """This endpoint in a child process, stopped when the caller exits; and its URL."""
    endpoint = subprocess.Popen(
        [sys.executable, __file__, "--watch-stdin", "--delay-ms", f"{delay_ms}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert endpoint.stdout is not None
    line = endpoint.stdout.readline().decode().split()
    if line[:1] != ["PORT"]:
        endpoint.kill()
        raise RuntimeError("bench/http_endpoint.py did not start")
    return endpoint, f"http://127.0.0.1:{line[1]}/sync"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.delay_ms / 1000, args.host, args.port, args.watch_stdin))


if __name__ == "__main__":
    main()
