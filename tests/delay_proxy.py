"""A TCP proxy in front of the test PostgreSQL that delays what the server sends back.

It listens on 127.0.0.1 and forwards each connection to the server (its unix socket, or its
TCP address when the tests run against ``CHUNKD_TEST_DSN``). Bytes from the client pass at
once; bytes from the server are held for ``delay_s`` seconds (order kept), so a statement
commits on the server while its reply is still on its way: the window in which a daemon can
be told to stop between a claim's commit and its reply.

With ``cut_on`` set, a connection whose client sends those bytes (a statement's text) is cut
instead: neither the statement nor anything after it reaches the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


def upstream_of(dsn: str) -> str | tuple[str, int]:
    """Where ``dsn`` connects: a unix socket path, or (host, port)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    port = int((query.get("port") or [parts.port or 5432])[0])
    host = (query.get("host") or [parts.hostname or "/var/run/postgresql"])[0]
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


class DelayProxy:
    def __init__(self, dsn: str, *, delay_s: float, cut_on: bytes | None = None) -> None:
        self._dsn = dsn
        self.cut_on = cut_on
        self._upstream = upstream_of(dsn)
        self.delay_s = delay_s  # may be changed while connections are open
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def dsn(self) -> str:
        """The test DSN, pointed at the proxy (user, password and database unchanged)."""
        parts = urlsplit(self._dsn)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable"))

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if isinstance(self._upstream, str):
                server_r, server_w = await asyncio.open_unix_connection(self._upstream)
            else:
                server_r, server_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, delayed=False),
                self._pipe(server_r, client_w, delayed=True),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                with contextlib.suppress(Exception):
                    writer.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        seen = b""
        try:
            while True:
                data = await reader.read(65536)
                seen = seen[-4096:] + data
                if not delayed and self.cut_on is not None and self.cut_on in seen:
                    data = b""  # cut: the server sees the end of the connection instead
                held.put_nowait((loop.time() + (self.delay_s if delayed else 0.0), data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
