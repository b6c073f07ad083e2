"""Payloads nested deeper than Python can decode (issue #21, K18). jsonb accepts a value
3,000 levels deep; Python's json stops near 1,000 (its recursion limit) with a RecursionError.
A Python handler's chunk fails at once with a clear error (it used to be retried up to
max_attempts though it could never pass); ``exec:`` and ``http:`` handlers get the payload
byte for byte, and a result too deep to read fails its chunk at once; the dashboard shows a
placeholder (its payload views answered 500); the JSON API and ``chunkd status`` work."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from uuid import UUID

import asyncpg
import httpx
import pytest

from chunkd.db import DatabaseError, connect
from daemon_helpers import run_chunkd, wait_until
from http_stub import StubHandler
from web_helpers import serve

DEPTH = 3000
DEEP = "[" * DEPTH + "]" * DEPTH  # the input: jsonb takes it, Python's json cannot
DEEP_OBJECT = '{"a":' * DEPTH + "1" + "}" * DEPTH
FAST = ["--retry-base", "100ms", "--retry-cap", "1s"]


async def _enqueue(conn: asyncpg.Connection, kind: str, chunks: str, payload: str = "{}") -> UUID:
    """A job created through SQL, as an application would: 3 attempts per chunk."""
    job: UUID = await conn.fetchval(
        "SELECT chunkd.create_sync_job($1, $2::text::jsonb, $3::text::jsonb, max_attempts => 3)",
        kind,
        chunks,
        payload,
    )
    return job


async def _ended(conn: asyncpg.Connection, job: UUID) -> list[asyncpg.Record]:
    """The job's chunks once none is pending or processing (seq, status, attempts, error)."""

    async def ended() -> list[asyncpg.Record] | None:
        rows = await conn.fetch(
            "SELECT seq, status, attempts, error_message FROM chunkd.chunk_processing_queue"
            " WHERE parent_sync_job_id = $1 ORDER BY seq",
            job,
        )
        return None if any(r["status"] in ("pending", "processing") for r in rows) else rows

    found: list[asyncpg.Record] = await wait_until(ended, timeout_s=30, what=f"job {job} to end")
    return found


async def test_a_python_handler_fails_a_payload_too_deep_at_once(db, start) -> None:
    """The issue's input: one attempt, not three, with an error that says why; the chunk
    beside it completes, and so does a handler that wraps the decode error in its own."""
    daemon = start(
        "--handler", "test=daemon_handlers:record", "--handler", "wrap=daemon_handlers:wrapping",
        *FAST,
    )  # fmt: skip
    job = await _enqueue(db, "test", f'[{DEEP}, {{"i": 1}}]')
    wrapped = await _enqueue(db, "wrap", f"[{DEEP_OBJECT}]")
    in_job_payload = await _enqueue(db, "wrap", '[{"i": 1}]', payload=DEEP)
    deep, plain = await _ended(db, job)
    assert (deep["status"], deep["attempts"]) == ("failed", 1)
    assert "payload cannot be decoded" in deep["error_message"]
    assert "nested too deeply" in deep["error_message"]
    assert (plain["status"], plain["attempts"]) == ("completed", 1)
    for other in (wrapped, in_job_payload):
        (row,) = await _ended(db, other)
        assert (row["status"], row["attempts"]) == ("failed", 1), row
        assert "RuntimeError: could not read chunk 0" in row["error_message"]
        assert "nested too deeply" in row["error_message"]
    assert daemon.process.poll() is None
    assert "task.crashed" not in {e["event"] for e in daemon.events()}


async def test_exec_passes_the_payload_through_and_fails_a_result_too_deep(db, start) -> None:
    """A command gets the 3,000-deep payload byte for byte (wc -c counts it); one that echoes
    it back prints a result too deep for Python to read: that chunk fails at once, clearly."""
    daemon = start("--handler", "count=exec:wc -c", "--handler", "echo=exec:cat", *FAST)
    counted = await _enqueue(db, "count", f"[{DEEP}]")
    echoed = await _enqueue(db, "echo", f'[{DEEP}, {{"i": 1}}]')
    (row,) = await _ended(db, counted)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    stdin_bytes = await db.fetchval(
        "SELECT result::text::int FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        counted,
    )
    assert stdin_bytes > 2 * DEPTH
    deep, plain = await _ended(db, echoed)
    assert (deep["status"], deep["attempts"]) == ("failed", 1)
    assert "'cat' printed JSON nested too deeply" in deep["error_message"]
    assert (plain["status"], plain["attempts"]) == ("completed", 1)
    assert daemon.process.poll() is None


class _Echo(StubHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/echo":
            self._reply(200, body, {"Content-Type": "application/json"})
        else:
            self._reply(200, b'{"ok": true}', {"Content-Type": "application/json"})


@pytest.fixture
def echo_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    httpd.daemon_threads = False
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="test-echo")
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


async def test_http_sends_the_payload_and_fails_a_response_too_deep(db, start, echo_server) -> None:
    daemon = start(
        "--handler", f"ok=http:{echo_server}/ok", "--handler", f"echo=http:{echo_server}/echo",
        *FAST,
    )  # fmt: skip
    sent = await _enqueue(db, "ok", f"[{DEEP}]")
    echoed = await _enqueue(db, "echo", f"[{DEEP}]")
    (row,) = await _ended(db, sent)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    (row,) = await _ended(db, echoed)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "nested too deeply" in row["error_message"] and "/echo" in row["error_message"]
    assert daemon.process.poll() is None


async def test_dashboard_api_and_status_show_a_payload_too_deep(conn, database) -> None:
    """The dashboard's payload views answer 200 with a placeholder (they answered 500), as do
    its pages; the JSON API never carries payloads, so it answers as for any job; so does
    ``chunkd status``. 600 deep is another way in: Python decodes it, but the view's
    redaction and indentation recursed past the limit."""
    job = await _enqueue(conn, "test", f'[{DEEP}, {"[" * 600 + "]" * 600}, {{"i": 1}}]', DEEP)
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        for path in (f"/jobs/{job}/payload", *(f"/jobs/{job}/chunks/{s}/payload" for s in (0, 1))):
            shown = await http.get(path)
            assert shown.status_code == 200, (path, shown.text[-500:])
            assert "nested too deeply to show" in shown.text, path
        plain = await http.get(f"/jobs/{job}/chunks/2/payload")
        assert plain.status_code == 200 and "&#34;i&#34;: 1" in plain.text
        for path in ("/jobs", f"/jobs/{job}", f"/jobs/{job}/chunks/0"):
            page = await http.get(path)
            assert page.status_code == 200, (path, page.text[-500:])
        progress = await http.get(f"/api/jobs/{job}")
        assert progress.status_code == 200 and progress.json()["total_chunks"] == 3
        assert "payload" not in progress.json()
        states = await http.get(f"/api/jobs/{job}/chunks")
        assert states.status_code == 200 and states.json()["states"] == "ppp"
    status = await asyncio.to_thread(run_chunkd, "status", str(job), "--dsn", database.dsn)
    assert status.code == 0 and status.stderr == "", status.stderr
    listing = await asyncio.to_thread(run_chunkd, "status", "--json", "--dsn", database.dsn)
    assert listing.code == 0 and json.loads(listing.stdout)[0]["sync_job_id"] == str(job)


async def test_a_chunkd_connection_reads_jsonb_too_deep_as_one_clear_error(database) -> None:
    """Any other statement that returns such a value decoded (a jsonb column a future page
    shows) gets a data error in one line, as from the server, instead of a RecursionError
    that no caller expects; the connection stays usable."""
    conn = await connect(database.dsn)
    try:
        with pytest.raises(DatabaseError, match="jsonb value nested too deeply") as raised:
            await conn.fetchval("SELECT $1::text::jsonb", DEEP)
        assert raised.value.sqlstate == "22000"
        assert await conn.fetchval("SELECT $1::text::jsonb", '{"a": [1]}') == {"a": [1]}
    finally:
        await conn.close()
