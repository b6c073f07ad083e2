"""Log volume (issue #11): at info, per-chunk success lines are off, every failure and retry is
still one line, and one ``job.progress`` line per job per interval sums up the rest."""

from __future__ import annotations

from collections import Counter

import asyncpg

from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts

RECORD = "test=daemon_handlers:record"
FAST = ["--retry-base", "100ms", "--retry-cap", "200ms", "--progress-interval", "300ms"]


async def test_info_level_logs_failures_and_progress_not_each_success(db, start) -> None:
    big = await create_job(db, [{"sleep_s": 0.001}] * 200)
    mixed = await create_job(
        db, [{}] * 10 + [{"fail": "permanent"}] * 2 + [{"fail_until": 1}] * 3, max_attempts=3
    )
    daemon = start("--handler", RECORD, "--concurrency", "8", *FAST, log_level="info")

    async def done() -> bool:
        return await status_counts(db, big) == {"completed": 200} and (
            await status_counts(db, mixed) == {"completed": 13, "failed": 2}
        )

    await wait_until(done, timeout_s=30, what="both jobs finished")

    # The last outcomes are counted in the next interval's lines: wait for them.
    async def all_counted() -> bool:
        lines = [e for e in daemon.events() if e["event"] == "job.progress"]
        return sum(e["completed"] for e in lines) == 213

    await wait_until(all_counted, timeout_s=10, what="progress lines counting 213 completions")
    assert await daemon.stop() == 0
    events = daemon.events()
    kinds = Counter(e["event"] for e in events)
    assert kinds["chunk.completed"] == 0 and kinds["chunk.claimed"] == 0, kinds
    assert kinds["chunk.failed"] == 2 and kinds["chunk.retry_scheduled"] == 3, kinds

    progress = [e for e in events if e["event"] == "job.progress"]
    per_job: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    for line in progress:
        per_job[line["sync_job_id"]] += line["completed"]
        failed[line["sync_job_id"]] += line["failed"]
        retried[line["sync_job_id"]] += line["retried"]
        assert line["kind"] == "test" and line["in_flight"] >= 0 and line["per_second"] >= 0
    assert per_job == {str(big): 200, str(mixed): 13}
    assert failed == {str(big): 0, str(mixed): 2} and retried == {str(big): 0, str(mixed): 3}
    totals = [e for e in events if e["event"] == "progress"]
    assert sum(e["completed"] for e in totals) == 213 and sum(e["failed"] for e in totals) == 2
    # Bounded by the interval, not by the chunks: a few lines, not hundreds.
    assert len(progress) + len(totals) < 100, len(progress) + len(totals)


async def test_debug_level_logs_each_success(db, start) -> None:
    job = await create_job(db, [{}] * 5)
    daemon = start("--handler", RECORD, *FAST, log_level="debug")
    await wait_until(lambda: _completed(db, job), timeout_s=20, what="5 completions")
    assert await daemon.stop() == 0
    lines = [e for e in daemon.events() if e["event"] == "chunk.completed"]
    assert sorted(e["seq"] for e in lines) == [0, 1, 2, 3, 4]
    assert all(e["sync_job_id"] == str(job) and e["duration_ms"] >= 0 for e in lines)


async def test_a_stop_sums_up_the_outcomes_since_the_last_interval(db, start) -> None:
    job = await create_job(db, [{}] * 5)
    daemon = start("--handler", RECORD, "--progress-interval", "1h", log_level="info")
    await wait_until(lambda: _completed(db, job), timeout_s=20, what="5 completions")
    assert not [e for e in daemon.events() if e["event"] == "job.progress"], "no interval yet"
    assert await daemon.stop() == 0
    events = daemon.events()
    (line,) = [e for e in events if e["event"] == "job.progress"]
    assert line["sync_job_id"] == str(job) and line["completed"] == 5 and line["in_flight"] == 0
    assert [e["event"] for e in events][-1] == "daemon.stopped"


async def _completed(db: asyncpg.Connection, job) -> bool:
    return await status_counts(db, job) == {"completed": 5}
