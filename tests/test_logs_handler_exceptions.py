"""A handler's exception in the outcome lines it causes: at ``--log-level debug``,
``chunk.retry_scheduled``, ``chunk.failed`` (and ``chunk.snoozed``, ``chunk.fenced``) carry its
traceback as text in ``exception``, chained causes included and never a frame's local
variables; at info they keep the one-line ``error``. Real ``chunkd run`` processes.
"""

from __future__ import annotations

import re
import socket

import asyncpg

from daemon_helpers import Daemon, wait_until
from sql_helpers import create_job, status_counts

CHAINED = "test=daemon_handlers:chained"
FAST = ["--retry-base", "50ms", "--retry-cap", "100ms"]
# Only in the payload, so only in the handler's locals: no log line may show it.
TOKEN = "tok-3f9a-local-value"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT")


async def _run_to_failure(db: asyncpg.Connection, start, **options: str) -> Daemon:  # type: ignore[no-untyped-def]
    """One chunk of ``chained``, two attempts: a retry, then the failure for good."""
    job = await create_job(db, [{"token": TOKEN}], max_attempts=2)
    daemon = start("--handler", CHAINED, *FAST, **options)

    async def failed() -> bool:
        return await status_counts(db, job) == {"failed": 1} and "chunk.failed" in daemon.log_text()

    await wait_until(failed, timeout_s=30, what="the chunk failed for good")
    assert await daemon.stop() == 0
    assert TOKEN not in daemon.log_text()
    return daemon


def _assert_chained_traceback(text: str) -> None:
    assert text.startswith("Traceback (most recent call last):"), text
    cause = text.index("ValueError: no mailbox \\udcff here")
    link = text.index("The above exception was the direct cause of the following exception:")
    assert cause < link < text.index("RuntimeError: handler failed"), text
    assert "in chained" in text and "in _open_mailbox" in text, text
    assert not text.endswith("\n"), text


async def test_debug_json_outcome_lines_carry_the_handlers_traceback(db, start) -> None:
    daemon = await _run_to_failure(db, start)
    lines = [e for e in daemon.events() if e["event"] in ("chunk.retry_scheduled", "chunk.failed")]
    assert [e["event"] for e in lines] == ["chunk.retry_scheduled", "chunk.failed"], lines
    for line in lines:
        assert line["error"] == "RuntimeError: handler failed", line
        _assert_chained_traceback(line["exception"])


async def test_debug_console_outcome_lines_carry_the_handlers_traceback(db, start) -> None:
    daemon = await _run_to_failure(db, start, log_format="console")
    lines = daemon.log_text().splitlines()
    for event in ("chunk.retry_scheduled", "chunk.failed"):
        [at] = [i for i, line in enumerate(lines) if re.search(rf"\] {event}\s", line)]
        assert "error='RuntimeError: handler failed'" in lines[at], lines[at]
        # The traceback: the plain lines under the event, up to the next event's timestamp.
        end = next((i for i in range(at + 1, len(lines)) if TIMESTAMP.match(lines[i])), len(lines))
        _assert_chained_traceback("\n".join(lines[at + 1 : end]))


async def test_info_outcome_lines_keep_the_one_line_error(db, start) -> None:
    daemon = await _run_to_failure(db, start, log_level="info")
    lines = [e for e in daemon.events() if e["event"] in ("chunk.retry_scheduled", "chunk.failed")]
    assert len(lines) == 2, lines
    for line in lines:
        assert line["error"] == "RuntimeError: handler failed" and "exception" not in line, line
    assert "Traceback" not in daemon.log_text()


async def test_an_http_handlers_traceback_shows_no_header_value(db, start) -> None:
    """An ``http:`` handler raises ``from None``: aiohttp's chain, whose frames hold the
    request and its headers, is not in the traceback a debug line carries."""
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    secret = "Bearer hdr-5e7c-secret"
    job = await create_job(db, [{"i": 1}], max_attempts=1)
    daemon = start(
        "--handler", f"test=http:http://127.0.0.1:{port}/chunk",
        env={"CHUNKD_HTTP_HEADERS": f"Authorization: {secret}"},
    )  # fmt: skip

    async def failed() -> bool:
        return await status_counts(db, job) == {"failed": 1} and "chunk.failed" in daemon.log_text()

    await wait_until(failed, timeout_s=30, what="the chunk failed")
    assert await daemon.stop() == 0
    [line] = [e for e in daemon.events() if e["event"] == "chunk.failed"]
    assert line["exception"].startswith("Traceback (most recent call last):"), line
    assert "HttpRetryableError: connection error calling" in line["exception"], line
    assert "The above exception" not in line["exception"], line
    assert "During handling" not in line["exception"], line
    assert secret not in daemon.log_text() and "hdr-5e7c" not in daemon.log_text()
