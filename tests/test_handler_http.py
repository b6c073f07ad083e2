"""The http handler against a real local HTTP server (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import uuid4

import pytest

from chunkd import Chunk, PermanentError, RetryLater
from chunkd.handlers import HandlerError
from chunkd.handlers.http import (
    MAX_RETRY_AFTER_S,
    HttpHandler,
    HttpRetryableError,
    headers_from_env,
    parse_header_option,
    parse_retry_after,
)
from http_stub import StubHandler

SECRET = "Bearer s3cr3t-token-value"
IN_FLIGHT = 150  # above aiohttp's default pool size (100)


@dataclass
class Received:
    """What the server saw, recorded per request for the assertions."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    base_url: str
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    # Answers only once this many requests are in flight at the same time.
    barrier: threading.Barrier = field(
        default_factory=lambda: threading.Barrier(IN_FLIGHT, timeout=10)
    )


def _make_handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(StubHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            server.requests.append(Received(self.path, dict(self.headers.items()), body))
            path = self.path
            if path == "/json":
                self._reply(200, b'{"synced": 3}', {"Content-Type": "application/json"})
            elif path == "/text":
                self._reply(200, b"all good\n", {"Content-Type": "text/plain"})
            elif path == "/empty":
                self._reply(204, b"")
            elif path == "/404":
                # A server echoing the credential back must not leak it into our error.
                echoed = f"no such function (you sent {self.headers['Authorization']})"
                self._reply(404, echoed.encode())
            elif path == "/429":
                self._reply(429, b"slow down", {"Retry-After": "7"})
            elif path == "/503-date":
                when = datetime.now(UTC) + timedelta(seconds=30)
                self._reply(503, b"maintenance", {"Retry-After": format_datetime(when, True)})
            elif path == "/503-huge":
                self._reply(503, b"maintenance", {"Retry-After": "999999"})
            elif path == "/500":
                self._reply(500, b"x" * 1000)
            elif path == "/302":
                self._reply(302, b"", {"Location": "https://elsewhere.example/"})
            elif path == "/together":
                try:
                    server.barrier.wait()
                except threading.BrokenBarrierError:
                    self._reply(503, b"not all requests arrived together")
                else:
                    self._reply(200, b"{}")
            elif path == "/slow":
                server.release.wait(10)
                try:
                    self._reply(200, b"{}")
                except OSError:  # the client gave up long ago
                    pass
            else:
                self._reply(400, b"unknown test path")

    return Handler


class _Listener(ThreadingHTTPServer):
    request_queue_size = 2 * IN_FLIGHT  # the default backlog (5) drops simultaneous connects


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base_url="")
    httpd = _Listener(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = False  # so server_close() joins request threads: nothing leaks
    host, port = httpd.server_address[:2]
    state.base_url = f"http://{host}:{port}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="test-http-server")
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
async def make_handler() -> AsyncIterator[Any]:
    """Build handlers that are always closed, even when the test fails."""
    created: list[HttpHandler] = []

    def make(url: str, timeout_s: float = 5.0) -> HttpHandler:
        handler = HttpHandler(url, headers={"Authorization": SECRET}, timeout_s=timeout_s)
        created.append(handler)
        return handler

    yield make
    for handler in created:
        await handler.aclose()


def make_chunk() -> Chunk:
    return Chunk(
        queue_id=uuid4(),
        chunk_id=uuid4(),
        sync_job_id=uuid4(),
        seq=0,
        attempt=1,
        kind="k",
        payload={"mailbox": "a@example.com", "page": 2},
        job_payload={"tenant": "t1"},
    )


async def test_json_result_and_request_contents(server: Server, make_handler: Any) -> None:
    handler = make_handler(f"{server.base_url}/json")
    chunk = make_chunk()
    assert await handler(chunk) == {"synced": 3}
    assert await handler(chunk) == {"synced": 3}  # the pooled client works twice

    received = server.requests[0]
    assert json.loads(received.body) == chunk.to_json_dict()
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["Idempotency-Key"] == chunk.idempotency_key
    assert received.headers["Authorization"] == SECRET
    assert received.headers["User-Agent"].startswith("chunkd/")


async def test_non_json_body_is_returned_as_text(server: Server, make_handler: Any) -> None:
    assert await make_handler(f"{server.base_url}/text")(make_chunk()) == "all good\n"


async def test_empty_body_is_none(server: Server, make_handler: Any) -> None:
    assert await make_handler(f"{server.base_url}/empty")(make_chunk()) is None


async def test_404_is_permanent_without_leaking_headers(server: Server, make_handler: Any) -> None:
    handler = make_handler(f"{server.base_url}/404")
    with pytest.raises(PermanentError) as info:
        await handler(make_chunk())
    message = str(info.value)
    assert "404" in message
    assert "no such function" in message
    assert SECRET not in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in repr(handler)


async def test_429_retry_after_seconds(server: Server, make_handler: Any) -> None:
    with pytest.raises(RetryLater) as info:
        await make_handler(f"{server.base_url}/429")(make_chunk())
    assert info.value.delay_s == 7
    assert "429" in str(info.value)


async def test_503_retry_after_http_date(server: Server, make_handler: Any) -> None:
    with pytest.raises(RetryLater) as info:
        await make_handler(f"{server.base_url}/503-date")(make_chunk())
    assert 25 <= info.value.delay_s <= 31


async def test_retry_after_is_capped(server: Server, make_handler: Any) -> None:
    with pytest.raises(RetryLater) as info:
        await make_handler(f"{server.base_url}/503-huge")(make_chunk())
    assert info.value.delay_s == MAX_RETRY_AFTER_S


async def test_500_is_plain_retryable(server: Server, make_handler: Any) -> None:
    with pytest.raises(Exception) as info:
        await make_handler(f"{server.base_url}/500")(make_chunk())
    assert isinstance(info.value, HttpRetryableError)
    assert not isinstance(info.value, PermanentError | RetryLater)
    message = str(info.value)
    assert message.startswith(f"HTTP 500 from {server.base_url}/500: ")
    assert len(message) < 300  # the body excerpt is capped


async def test_redirect_is_not_followed(server: Server, make_handler: Any) -> None:
    with pytest.raises(PermanentError, match="302"):
        await make_handler(f"{server.base_url}/302")(make_chunk())
    assert [r.path for r in server.requests] == ["/302"]


async def test_the_pool_has_no_cap_of_its_own(server: Server, make_handler: Any) -> None:
    """The daemon's --concurrency bounds requests in flight, not a pool size below it."""
    handler = make_handler(f"{server.base_url}/together", timeout_s=20)
    results = await asyncio.gather(*(handler(make_chunk()) for _ in range(IN_FLIGHT)))
    assert results == [{}] * IN_FLIGHT


async def test_timeout_is_retryable(server: Server, make_handler: Any) -> None:
    handler = make_handler(f"{server.base_url}/slow", timeout_s=0.3)
    with pytest.raises(HttpRetryableError, match=r"timeout after 0\.3s"):
        await handler(make_chunk())


async def test_cancellation_mid_request_is_clean(server: Server, make_handler: Any) -> None:
    """The daemon's per-chunk timeout cancels us; the pooled client must survive it."""
    handler = make_handler(f"{server.base_url}/slow")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handler(make_chunk()), 0.2)
    server.release.set()
    assert await handler(make_chunk()) == {}


async def test_refused_connection_is_retryable(make_handler: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HttpRetryableError, match="connection error calling"):
        await make_handler(f"http://127.0.0.1:{port}/x")(make_chunk())


async def test_a_proxy_from_the_environment_is_used(
    server: Server, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY / NO_PROXY are honoured, as they were before the switch to aiohttp."""
    for name in ("no_proxy", "https_proxy", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url)
    target = "http://chunkd-proxy-test.invalid/json"
    with pytest.raises(PermanentError, match="HTTP 400"):  # the stub is no real proxy
        await make_handler(target)(make_chunk())
    assert [r.path for r in server.requests] == [target]  # the absolute form: via the proxy
    monkeypatch.setenv("NO_PROXY", "chunkd-proxy-test.invalid")
    with pytest.raises(HttpRetryableError, match="connection error"):  # no such host
        await make_handler(target)(make_chunk())
    assert len(server.requests) == 1


async def test_closed_handler_refuses_calls(server: Server) -> None:
    handler = HttpHandler(f"{server.base_url}/json", timeout_s=5)
    assert await handler(make_chunk()) == {"synced": 3}
    await handler.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await handler(make_chunk())


def test_spec_forms() -> None:
    assert HttpHandler("http://h/x").url == "http://h/x"
    assert HttpHandler("https://h/x").url == "https://h/x"
    assert HttpHandler("http:https://h/x").url == "https://h/x"
    assert HttpHandler("https://u:pw@h:8443/x?key=1").display_url == "https://h:8443/x?…"
    for bad in ("http:/nohost", "ftp://h/x", "http://h:99999/x"):
        with pytest.raises(HandlerError):
            HttpHandler(bad)
    with pytest.raises(ValueError, match="'X-Bad'"):
        HttpHandler("http://h/x", headers={"X-Bad": ""})


def test_parse_header_option() -> None:
    assert parse_header_option("Authorization: Bearer abc:def") == (
        "Authorization",
        "Bearer abc:def",
    )
    assert parse_header_option("  apikey :  k  ") == ("apikey", "k")
    for bad in ("Authorization Bearer secretvalue", ": value", "Bad Name: secretvalue"):
        with pytest.raises(ValueError) as info:
            parse_header_option(bad)
        assert "secretvalue" not in str(info.value)


def test_headers_from_env() -> None:
    text = "Authorization: Bearer t\n\n# comment\r\napikey: k\n"
    assert headers_from_env(text) == {"Authorization": "Bearer t", "apikey": "k"}
    assert headers_from_env("") == {}
    with pytest.raises(ValueError, match="line 2"):
        headers_from_env("A: 1\nbroken\n")
    with pytest.raises(ValueError, match="given twice"):
        headers_from_env("A: 1\na: 2\n")


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 0 ") == 0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now=now) == 0  # in the past
    assert parse_retry_after("86400") == MAX_RETRY_AFTER_S
    for junk in (None, "", "-5", "soon", "1e9"):
        assert parse_retry_after(junk) is None
