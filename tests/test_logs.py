"""Log lines: every exception, whoever logs it (a library through the stdlib, or chunkd through
structlog), is its traceback as text, in JSON and on the console.

Before, a stdlib record's exception reached the JSON renderer as the raw ``exc_info`` tuple,
rendered as ``["<class ...>", "...", "<traceback object at 0x...>"]``; and the console showed
a library's exception with rich's frame locals, where a DSN or token could appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
import uvicorn

from chunkd.observability.logs import LogFormat, configure_logging

SECRET = "s3cret-local-value"


@pytest.fixture
def capture() -> Iterator[Any]:
    """``configure(fmt)`` sets chunkd's logging up on a buffer and returns it; the previous
    logging set-up is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_config = structlog.get_config()

    def configure(fmt: LogFormat) -> io.StringIO:
        out = io.StringIO()
        configure_logging(fmt, "info", stream=out)
        return out

    try:
        yield configure
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_config)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _assert_traceback_text(line: dict[str, Any], error: str) -> None:
    assert "exc_info" not in line, line
    text = line["exception"]
    assert isinstance(text, str), line
    assert text.startswith("Traceback (most recent call last):"), text
    assert error in text and "<traceback object" not in text, text


async def _failing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    password = SECRET  # a local that must never reach a log line  # noqa: F841
    raise ZeroDivisionError("the ASGI app failed")


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its own handlers
        yield


async def _request_a_failing_uvicorn_app() -> None:
    """A real uvicorn server whose app raises: uvicorn logs "Exception in ASGI application"
    with the exception, on its stdlib logger ``uvicorn.error``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_failing_app, log_config=None, access_log=False, lifespan="off")
    server = _QuietServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        port = sock.getsockname()[1]
        async with httpx.AsyncClient() as client:
            for _ in range(100):  # until the server accepts (bounded: 10 s)
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("uvicorn did not start within 10 s")
        assert response.status_code == 500
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
        sock.close()


async def _asyncpg_style_failure() -> None:
    """A real asyncpg error, logged the way asyncpg's pool logs one (``logger.warning(...,
    exc_info=True)`` on ``asyncpg.pool``) when it cannot restore its connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    try:
        await asyncpg.connect(f"postgresql://nobody:{SECRET}@127.0.0.1:{port}/db", timeout=5)
    except OSError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor; retrying", exc_info=True
        )
    else:  # pragma: no cover - nothing listens on the port
        raise AssertionError("connected to a closed port")


def _asyncio_exception_handler() -> None:
    """asyncio's default exception handler (a callback or task that raised): ``asyncio``
    logger, ``logger.error(..., exc_info=...)``."""
    loop = asyncio.get_running_loop()
    try:
        {}["lost-key"]
    except KeyError as exc:
        loop.call_exception_handler(
            {"message": "Task exception was never retrieved", "exception": exc}
        )


def _chunkd_logs_an_exception() -> None:
    """How chunkd logs one itself (a crashed task: ``log.exception``, structlog)."""
    try:
        raise RuntimeError("a task crashed")
    except RuntimeError:
        structlog.get_logger("chunkd.runtime.supervisor").exception("task.crashed", task="t")


async def test_json_lines_carry_every_exception_as_traceback_text(capture) -> None:
    out = capture("json")
    await _request_a_failing_uvicorn_app()
    await _asyncpg_style_failure()
    _asyncio_exception_handler()
    _chunkd_logs_an_exception()

    # uvicorn's message ends in a newline of its own.
    lines = {line["event"].strip(): line for line in _json_lines(out.getvalue())}
    uvicorn_line = lines["Exception in ASGI application"]
    assert uvicorn_line["logger"] == "uvicorn.error" and uvicorn_line["level"] == "error"
    _assert_traceback_text(uvicorn_line, "ZeroDivisionError: the ASGI app failed")
    asyncpg_line = lines["Failed to restore the pool connection floor; retrying"]
    assert asyncpg_line["logger"] == "asyncpg.pool" and asyncpg_line["level"] == "warning"
    _assert_traceback_text(asyncpg_line, "ConnectionRefusedError")
    asyncio_line = lines["Task exception was never retrieved"]
    assert asyncio_line["logger"] == "asyncio"
    _assert_traceback_text(asyncio_line, "KeyError: 'lost-key'")
    ours = lines["task.crashed"]
    _assert_traceback_text(ours, "RuntimeError: a task crashed")
    assert SECRET not in out.getvalue()


async def test_console_lines_carry_every_exception_as_plain_traceback(capture) -> None:
    out = capture("console")
    await _request_a_failing_uvicorn_app()
    await _asyncpg_style_failure()
    _chunkd_logs_an_exception()

    text = out.getvalue()
    for event, error in (
        ("Exception in ASGI application", "ZeroDivisionError: the ASGI app failed"),
        ("Failed to restore the pool connection floor; retrying", "ConnectionRefusedError"),
        ("task.crashed", "RuntimeError: a task crashed"),
    ):
        after = text[text.index(event) :]
        # The event's line, then the traceback as Python prints it.
        assert "\nTraceback (most recent call last):\n" in after, text
        assert error in after, text
    # Plain tracebacks: no frame boxes, no local variables (a local may hold a secret).
    assert "<traceback object" not in text and "╭" not in text
    assert SECRET not in text, text
