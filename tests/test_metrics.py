"""``chunkd run --metrics-port``: a real daemon scraped over HTTP, every number checked against
what the database recorded (the chunk_events audit trail and the queue itself)."""

from __future__ import annotations

import socket
from uuid import UUID

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon_helpers import Daemon, wait_until
from sql_helpers import create_job

RECORD = "test=daemon_handlers:record"
FAST = ["--reap-interval", "500ms", "--retry-base", "100ms", "--retry-cap", "1s"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _scrape(port: int) -> Samples | None:
    """Every sample by (name, sorted labels); None while the endpoint is not up yet."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
    except httpx.TransportError:
        return None
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def _events(conn: asyncpg.Connection, job: UUID) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT event, count(*) AS n FROM chunkd.chunk_events WHERE sync_job_id = $1 GROUP BY 1",
        job,
    )
    return {r["event"]: r["n"] for r in rows}


async def test_scraped_metrics_match_the_database(db, database, tmp_path) -> None:
    job = await create_job(
        db,
        [
            {"i": 0},
            {"i": 1},
            {"i": 2},
            {"fail": "permanent"},
            {"fail_until": 1},  # fails once, then completes
            {"fail": "retry_later", "delay_s": 600},  # snoozed for the whole test
        ],
    )
    # A kind this daemon has no handler for: it stays pending, seen only by queue_depth().
    await create_job(db, 4, kind="other")
    port = _free_port()
    daemon = Daemon(
        database.dsn,
        tmp_path / "daemon.log",
        "--handler", RECORD, "--metrics-port", str(port), *FAST,
        env={"CHUNKD_METRICS_INTERVAL": "300ms"},
    )  # fmt: skip
    try:

        async def settled() -> dict[str, int] | None:
            events = await _events(db, job)
            done = events.get("completed") == 4 and events.get("failed") == 1
            retried = events.get("retry_scheduled") == 1 and events.get("snoozed") == 1
            return events if done and retried else None

        events = await wait_until(
            settled, timeout_s=30, what="4 completed, 1 failed, 1 retry, 1 snooze"
        )
        executions = await db.fetchval("SELECT count(*) FROM public.test_executions")
        assert executions == events["claimed"] == 7  # 6 chunks, one ran twice

        async def scraped_all() -> Samples | None:
            samples = await _scrape(port)
            if samples is None:
                return None
            done = _value(samples, "chunkd_chunks_completed_total", kind="test") == 4
            return samples if done and _value(samples, "chunkd_chunks_in_flight") == 0 else None

        samples = await wait_until(scraped_all, timeout_s=10, what="final counters in a scrape")
        expected = {
            "chunkd_chunks_claimed_total": events["claimed"],
            "chunkd_chunks_completed_total": events["completed"],
            "chunkd_chunks_failed_total": events["failed"],
            "chunkd_chunks_retried_total": events["retry_scheduled"],
            "chunkd_chunks_snoozed_total": events["snoozed"],
            "chunkd_handler_duration_seconds_count": executions,
        }
        for name, count in expected.items():
            assert _value(samples, name, kind="test") == count, name
        assert _value(samples, "chunkd_handler_duration_seconds_bucket", kind="test", le="+Inf")
        assert _value(samples, "chunkd_handler_duration_seconds_sum", kind="test") > 0
        for name in ("fenced", "reaped", "released"):
            assert _value(samples, f"chunkd_chunks_{name}_total") == 0, name
        assert _value(samples, "chunkd_chunks_in_flight") == 0
        # Kinds are labels only for what was claimed: nothing of kind "other" ever ran here.
        assert _value(samples, "chunkd_chunks_claimed_total", kind="other") is None

        async def depth_is(pending: int) -> Samples | None:
            samples = await _scrape(port)
            want = {"pending": pending, "scheduled": 1, "processing": 0}
            got = {s: _value(samples or {}, "chunkd_queue_depth", status=s) for s in want}
            return samples if got == want else None

        # The sampled depth covers the whole queue: the unhandled kind's 4 pending chunks and
        # the retry_later chunk waiting for its run_at, with processing exported as 0.
        await wait_until(lambda: depth_is(4), timeout_s=10, what="queue depth 4/1/0")
        # New work shows up at the next sample, without the daemon touching it.
        await create_job(db, 3, kind="other")
        await wait_until(lambda: depth_is(7), timeout_s=5, what="queue depth resampled to 7")
        assert await daemon.stop() == 0
    finally:
        daemon.kill()
    assert not [e for e in daemon.events() if e["event"] == "depth.sample_failed"]
