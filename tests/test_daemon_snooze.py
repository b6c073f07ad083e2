"""``RetryLater`` snoozes under a real ``chunkd run``: a rate-limited chunk runs again after the
delay it asked for without spending an attempt, up to ``--max-snoozes``; the ``http:`` handler
does it for a 429 with ``Retry-After``; a one-at-a-time job keeps its order meanwhile."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from daemon_helpers import wait_until
from http_stub import StubHandler
from sql_helpers import create_job, status_counts

RECORD = "test=daemon_handlers:record"
FAST = ["--reap-interval", "500ms", "--retry-base", "100ms", "--retry-cap", "1s"]


async def _terminal(conn: asyncpg.Connection, job: UUID) -> bool:
    counts = await status_counts(conn, job)
    return not counts.get("pending") and not counts.get("processing")


async def _events(conn: asyncpg.Connection, job: UUID, *events: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT q.seq, e.event, e.status, e.attempt, e.error, e.delay_s, e.at"
        " FROM chunkd.chunk_events e"
        " JOIN chunkd.chunk_processing_queue q ON q.id = e.queue_id"
        " WHERE e.sync_job_id = $1 AND e.event = ANY ($2) ORDER BY e.at",
        job,
        list(events),
    )


async def _runs(conn: asyncpg.Connection, job: UUID) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT seq, attempt, started_at, ended_at FROM public.test_executions"
        " WHERE job_id = $1 ORDER BY started_at",
        job,
    )


async def test_three_retry_laters_then_success_complete_without_spending_an_attempt(
    db, start
) -> None:
    """The issue's input: three polite 429s on a max_attempts = 3 job used to fail it."""
    job = await create_job(db, [{"snooze": [0.2, 0.3, 0.4]}], max_attempts=3)
    daemon = start("--handler", RECORD, *FAST)
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="the snoozed chunk to end")

    row = await db.fetchrow(
        "SELECT status, attempts, result FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert row["result"] == {"seq": 0, "attempt": 1}
    runs = await _runs(db, job)
    assert [r["attempt"] for r in runs] == [1, 1, 1, 1]
    snoozed = await _events(db, job, "snoozed", "retry_scheduled", "failed")
    assert [(e["event"], e["status"], e["attempt"], e["delay_s"], e["error"]) for e in snoozed] == [
        ("snoozed", "pending", 0, delay, f"RetryLater: rate limited on run {n}")
        for n, delay in enumerate([0.2, 0.3, 0.4], start=1)
    ]
    # Each run started no sooner than the delay its snooze asked for.
    for event, later in zip(snoozed, runs[1:], strict=True):
        waited_s = (later["started_at"] - event["at"]).total_seconds()
        assert waited_s >= event["delay_s"] - 0.01, (event["delay_s"], waited_s)
    lines = [e for e in daemon.events() if e["event"] == "chunk.snoozed"]
    assert [(e["delay_s"], e["level"]) for e in lines] == [
        (0.2, "info"),
        (0.3, "info"),
        (0.4, "info"),
    ]
    assert not [e for e in daemon.events() if e["event"] == "chunk.retry_scheduled"]
    assert await daemon.stop() == 0


async def test_past_max_snoozes_a_retry_later_spends_attempts_and_fails_saying_why(
    db, start
) -> None:
    job = await create_job(db, [{"snooze": "always", "delay_s": 0.1}], max_attempts=2)
    daemon = start("--handler", RECORD, *FAST, "--max-snoozes", "2")
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="the chunk to fail")

    limit = "snooze limit (2) reached, counted as an attempt: RetryLater: rate limited on run"
    row = await db.fetchrow(
        "SELECT status, attempts, error_message FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["error_message"] == f"{limit} 4"
    outcomes = await _events(db, job, "snoozed", "retry_scheduled", "failed")
    assert [(e["event"], e["attempt"], e["delay_s"], e["error"]) for e in outcomes] == [
        ("snoozed", 0, 0.1, "RetryLater: rate limited on run 1"),
        ("snoozed", 0, 0.1, "RetryLater: rate limited on run 2"),
        ("retry_scheduled", 1, 0.1, f"{limit} 3"),
        ("failed", 2, None, f"{limit} 4"),
    ]
    assert [r["attempt"] for r in await _runs(db, job)] == [1, 1, 1, 2]
    events = daemon.events()
    assert len([e for e in events if e["event"] == "chunk.snoozed"]) == 2
    (retry,) = [e for e in events if e["event"] == "chunk.retry_scheduled"]
    (failed,) = [e for e in events if e["event"] == "chunk.failed"]
    assert retry["snooze_limit_reached"] == failed["snooze_limit_reached"] == 2
    assert await daemon.stop() == 0


@dataclass
class RateLimitedApi:
    """Answers 429 with ``Retry-After: 1`` to a chunk's first ``limited`` requests, then 200."""

    limited: int = 3
    url: str = ""
    requests: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(StubHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                key = self.headers["Idempotency-Key"]
                with api.lock:
                    api.requests.append((time.monotonic(), key, body))
                    seen = sum(1 for _, k, _ in api.requests if k == key)
                if seen <= api.limited:
                    self._reply(429, b"slow down", {"Retry-After": "1"})
                else:
                    self._reply(200, b'{"ok": true}', {"Content-Type": "application/json"})

        return Handler


@pytest.fixture
def rate_limited_api() -> Iterator[RateLimitedApi]:
    api = RateLimitedApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), api.handler_class())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}/sync"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_http_429_with_retry_after_three_times_then_200_completes_on_attempt_1(
    conn, start, rate_limited_api
) -> None:
    job = await create_job(conn, 2, max_attempts=3)
    daemon = start("--handler", f"test=http:{rate_limited_api.url}", *FAST)
    await wait_until(lambda: _terminal(conn, job), timeout_s=30, what="both chunks to end")

    rows = await conn.fetch(
        "SELECT status, attempts, result FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1 ORDER BY seq",
        job,
    )
    assert [tuple(r) for r in rows] == [("completed", 1, {"ok": True})] * 2
    snoozed = await _events(conn, job, "snoozed", "retry_scheduled", "failed")
    assert Counter(e["seq"] for e in snoozed) == {0: 3, 1: 3}
    for e in snoozed:
        assert (e["event"], e["attempt"], e["delay_s"]) == ("snoozed", 0, 1.0)
        assert e["error"].startswith("RetryLater: HTTP 429 from "), e["error"]
        assert e["error"].endswith(": slow down (Retry-After 1s)"), e["error"]
    # Four requests per chunk, all of attempt 1, each at least the Retry-After after the last.
    by_key: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for at, key, body in rate_limited_api.requests:
        by_key.setdefault(key, []).append((at, body))
    assert sorted(len(v) for v in by_key.values()) == [4, 4]
    for requests in by_key.values():
        assert {body["attempt"] for _, body in requests} == {1}
        for (before, _), (after, _) in itertools.pairwise(requests):
            assert after - before >= 0.99, after - before
    assert await daemon.stop() == 0


async def test_a_snoozed_chunk_of_a_one_at_a_time_job_holds_back_the_later_ones(db, start) -> None:
    job = await create_job(db, [{"snooze": [0.3, 0.3]}, {}, {}], max_concurrency=1)
    start("--handler", RECORD, "--concurrency", "4", *FAST)
    await wait_until(lambda: _terminal(db, job), timeout_s=30, what="the job to end")

    assert await status_counts(db, job) == {"completed": 3}
    runs = await _runs(db, job)
    assert [(r["seq"], r["attempt"]) for r in runs] == [(0, 1), (0, 1), (0, 1), (1, 1), (2, 1)]
    for before, after in itertools.pairwise(runs):
        assert before["ended_at"] <= after["started_at"], "one at a time, in order"
    # The later chunks waited out the snoozes rather than running meanwhile.
    first_done = runs[2]["ended_at"]
    assert (first_done - runs[0]["started_at"]).total_seconds() >= 0.6
