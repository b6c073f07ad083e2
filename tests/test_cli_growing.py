"""The commands for growing jobs and schedules: enqueue --open, append, close, wait (exit 0, 1,
124), schedule add|list|remove|pause|resume; every mistake one clear line."""

from __future__ import annotations

import asyncio
import json
import uuid

from sql_helpers import claim, complete, fail
from test_cli_ops import run_cli


async def test_open_job_append_close_and_wait(conn, database) -> None:
    dsn = database.dsn
    created = await run_cli("enqueue", "--kind", "feed", "--open", dsn=dsn, stdin="")
    assert created.exit_code == 0, created.stderr
    job = uuid.UUID(created.stdout.strip())
    appended = await run_cli("append", str(job), "-", dsn=dsn, stdin='{"n": 0}\n{"n": 1}\n')
    assert (appended.exit_code, appended.stdout.strip()) == (0, f"appended 2 chunks to job {job}")
    for row in await claim(conn, "w", 5):
        assert await complete(conn, row["queue_id"], "w", 1)
    timed_out = await run_cli("wait", str(job), "--timeout", "200ms", dsn=dsn)
    assert timed_out.exit_code == 124, "open: not finished although every chunk is done"
    assert timed_out.stderr.strip() == f"job {job} not finished after 0.2s"
    # The job is closed while `chunkd wait` waits (by SQL: CliRunner captures output
    # process-wide, so two commands cannot run at once here). Whether the close lands before
    # or after it LISTENs, it re-reads the state after LISTEN, so it cannot miss it.
    waiting = asyncio.create_task(run_cli("wait", str(job), "--timeout", "30s", dsn=dsn))
    await asyncio.sleep(0.3)
    assert await conn.fetchval("SELECT chunkd.close_sync_job($1)", job) is True
    done = await waiting
    assert (done.exit_code, done.stdout.strip()) == (0, f"job {job} completed")
    again = await run_cli("close", str(job), dsn=dsn)
    assert again.stdout.strip() == f"job {job} was already closed"
    made = await run_cli("enqueue", "--kind", "f", "--open", dsn=dsn, stdin="")
    assert made.exit_code == 0, made
    other = uuid.UUID(made.stdout.strip())
    closed = await run_cli("close", str(other), dsn=dsn)
    assert (closed.exit_code, closed.stdout.strip()) == (0, f"closed job {other}")
    refused = await run_cli("append", str(job), "-", dsn=dsn, stdin="[{}]")
    assert refused.exit_code == 2
    assert refused.error_line() == (
        f"sync job {job} is closed (or was not created open); chunks cannot be appended"
    )


async def test_wait_exits_1_on_partial_failure_and_2_on_mistakes(conn, database) -> None:
    dsn = database.dsn
    created = await run_cli("enqueue", "--kind", "k", "--on-finish-kind", "k2", dsn=dsn,
                            stdin="[{}]")  # fmt: skip
    job = uuid.UUID(created.stdout.strip())
    (row,) = await claim(conn, "w", 1, kinds=["k"])
    assert await fail(conn, row["queue_id"], "w", 1, retryable=False) == "failed"
    result = await run_cli("wait", str(job), dsn=dsn)
    assert (result.exit_code, result.stdout.strip()) == (1, f"job {job} partial_failure")
    follow = await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs WHERE kind = 'k2'")
    assert follow == 1
    unknown = await run_cli("wait", str(uuid.UUID(int=5)), dsn=dsn)
    assert unknown.exit_code == 2
    assert unknown.error_line() == f"no sync job {uuid.UUID(int=5)}"
    bad = await run_cli("append", "not-a-uuid", "-", dsn=dsn, stdin="[{}]")
    assert bad.exit_code == 2 and "is not a job id" in bad.error_line()
    empty = await run_cli("append", str(job), "-", dsn=dsn, stdin="[]")
    assert empty.error_line() == "the input array is empty: a job needs at least one chunk"


async def test_schedule_commands(conn, database) -> None:
    dsn = database.dsn
    added = await run_cli(
        "schedule", "add", "mailboxes", "--cron", "*/15 * * * *", "--kind", "plan",
        "--timezone", "Europe/Berlin", "--payload", '{"tenant": 1}', dsn=dsn,
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    assert added.stdout.strip() == "created schedule 'mailboxes': */15 * * * * (Europe/Berlin)"
    listed = await run_cli("schedule", "list", "--json", dsn=dsn)
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "mailboxes" and entry["kind"] == "plan" and entry["dedupe"] is True
    assert entry["next_fire_at"] is None  # planned by the first daemon that sees it
    table = await run_cli("schedule", "list", dsn=dsn)
    assert "mailboxes" in table.stdout and "not planned yet" in table.stdout
    assert (await run_cli("schedule", "pause", "mailboxes", dsn=dsn)).exit_code == 0
    assert json.loads((await run_cli("schedule", "list", "--json", dsn=dsn)).stdout)[0]["paused_at"]
    assert (await run_cli("schedule", "resume", "mailboxes", dsn=dsn)).exit_code == 0
    replaced = await run_cli(
        "schedule", "add", "mailboxes", "--cron", "0 * * * *", "--kind", "plan", dsn=dsn
    )
    assert replaced.stdout.startswith("updated schedule 'mailboxes'")
    removed = await run_cli("schedule", "remove", "mailboxes", dsn=dsn)
    assert removed.stdout.strip() == "removed schedule 'mailboxes'"
    assert json.loads((await run_cli("schedule", "list", "--json", dsn=dsn)).stdout) == []
    # Mistakes: one line each, exit 2, nothing created.
    for args, message in (
        (["--cron", "61 * * * *"], "'61 * * * *' is not a cron expression"),
        (["--cron", "* * * * *", "--timezone", "Mars/Base"], "'Mars/Base' is not a time zone"),
        (["--cron", "* * * * *", "--chunks", "{}"], "--chunks must be a non-empty JSON array"),
    ):
        result = await run_cli("schedule", "add", "x", "--kind", "k", *args, dsn=dsn)
        assert result.exit_code == 2, result.stderr
        assert message in result.error_line()
    gone = await run_cli("schedule", "remove", "x", dsn=dsn)
    assert gone.exit_code == 2 and gone.error_line() == "no schedule named 'x'"
    assert await conn.fetchval("SELECT count(*) FROM chunkd.schedules") == 0
