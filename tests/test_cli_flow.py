"""``chunkd pause``, ``resume`` and ``limit``, and what ``status`` and ``enqueue`` gained with
them, through the real CLI entry point against the test database."""

from __future__ import annotations

import json
import uuid

import pytest

from sql_helpers import claim, complete, create_job
from test_cli_ops import _restore_logging, run_cli

__all__ = ["_restore_logging"]  # the autouse fixture, re-exported so it applies here too


async def test_pause_and_resume_a_job_and_a_kind(database, conn) -> None:
    job = await create_job(conn, 3, kind="mail")
    await create_job(conn, 2, kind="imap")
    result = await run_cli("pause", str(job), dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"paused job {job}: 3 pending chunks held (chunks in flight finish)\n"
    result = await run_cli("pause", "--kind", "imap", dsn=database.dsn)
    assert result.stdout == "paused kind 'imap': 2 pending chunks held (chunks in flight finish)\n"
    assert await claim(conn, "w", 10) == []

    status = await run_cli("status", dsn=database.dsn)
    assert status.stdout.count("paused") >= 2
    assert "flow control: job " in status.stdout and "kind 'imap' paused" in status.stdout
    detail = await run_cli("status", str(job), dsn=database.dsn)
    assert "job paused since" in detail.stdout
    assert f"note: paused: `chunkd resume {job}` resumes it" in detail.stdout
    as_json = json.loads((await run_cli("status", str(job), "--json", dsn=database.dsn)).stdout)
    assert as_json["overall_status"] == "paused" and as_json["flow"]["paused_at"]

    result = await run_cli("resume", str(job), dsn=database.dsn)
    assert result.stdout == f"resumed job {job}: 3 pending chunks\n"
    result = await run_cli("resume", "--kind", "imap", dsn=database.dsn)
    assert result.stdout == "resumed kind 'imap': 2 pending chunks\n"
    assert len(await claim(conn, "w", 10)) == 5


async def test_a_paused_job_that_has_started_shows_no_eta(database, conn) -> None:
    job = await create_job(conn, 3, kind="mail")
    (row,) = await claim(conn, "w", 1)
    assert await complete(conn, row["queue_id"], "w", row["attempt"])
    assert (await run_cli("pause", str(job), dsn=database.dsn)).exit_code == 0
    detail = await run_cli("status", str(job), dsn=database.dsn)
    assert "chunks/s, eta none while paused" in detail.stdout, detail.stdout


async def test_limits_are_set_listed_and_removed(database, conn) -> None:
    result = await run_cli("limit", "--kind", "mail", "20/s", "--burst", "40", dsn=database.dsn)
    assert result.stdout == "kind 'mail': at most 20/s (burst 40)\n", result.stderr
    result = await run_cli("limit", "--kind", "imap", "90/m", dsn=database.dsn)
    assert result.stdout == "kind 'imap': at most 1.5/s (default burst)\n"
    result = await run_cli("limit", "--key", "tenant-1", "--concurrency", "2", dsn=database.dsn)
    assert result.stdout == "key 'tenant-1': at most 2 chunks processing at once\n"
    job = await create_job(conn, 4, kind="mail", concurrency_key="tenant-1", max_per_second=5)

    table = (await run_cli("limit", "--list", dsn=database.dsn)).stdout
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == [
        "scope", "name", "state", "rate", "burst", "tokens", "concurrency", "processing",
        "pending", "jobs",
    ]  # fmt: skip
    assert lines[1] == ["key", "tenant-1", "-", "-", "-", "-", "2", "0", "4", "1"]
    assert lines[2][:5] == ["kind", "imap", "-", "1.5/s", "1"]
    assert lines[3][:5] == ["kind", "mail", "-", "20/s", "40"]
    listed = json.loads((await run_cli("limit", "--list", "--json", dsn=database.dsn)).stdout)
    assert [(x["scope"], x["name"], x["per_second"]) for x in listed] == [
        ("key", "tenant-1", None),
        ("kind", "imap", 1.5),
        ("kind", "mail", 20.0),
    ]
    assert (await run_cli("limit", dsn=database.dsn)).stdout == table, "no option lists"

    detail = (await run_cli("status", str(job), dsn=database.dsn)).stdout
    assert "job rate 5/s (burst 2)" in detail
    assert "kind 'mail' rate 20/s (burst 40)" in detail
    assert "concurrency key 'tenant-1': at most 2 at once" in detail

    for args, said in (
        (("--kind", "mail", "none"), "removed the rate limit of kind 'mail'"),
        (("--kind", "imap", "off"), "removed the rate limit of kind 'imap'"),
        (("--key", "tenant-1", "--concurrency", "none"), "removed the concurrency limit of key"),
    ):
        result = await run_cli("limit", *args, dsn=database.dsn)
        assert result.exit_code == 0 and result.stdout.startswith(said), result.stderr
    assert await conn.fetchval("SELECT count(*) FROM chunkd.kind_flow") == 0
    assert await conn.fetchval("SELECT count(*) FROM chunkd.concurrency_limits") == 0


async def test_enqueue_with_a_rate_and_a_concurrency_key(database, conn) -> None:
    result = await run_cli(
        "enqueue", "--kind", "mail", "--max-per-second", "90/m", "--concurrency-key", "t-7", "-",
        dsn=database.dsn, stdin="[1, 2]",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    row = await conn.fetchrow(
        "SELECT max_per_second, concurrency_key FROM chunkd.sync_jobs WHERE id = $1",
        uuid.UUID(result.stdout.strip()),
    )
    assert (row["max_per_second"], row["concurrency_key"]) == (1.5, "t-7")
    bad = await run_cli(
        "enqueue", "--kind", "mail", "--max-per-second", "fast", "-", dsn=database.dsn, stdin="[1]"
    )
    assert bad.exit_code == 2 and "'fast' is not a rate" in bad.error_line()
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pause"], "give a JOB id or --kind KIND (one of them)"),
        (["resume", str(uuid.UUID(int=5)), "--kind", "k"], "give a JOB id or --kind KIND"),
        (["pause", "not-a-uuid"], "is not a job id"),
        (["pause", str(uuid.UUID(int=5))], f"no sync job {uuid.UUID(int=5)}"),
        (["pause", "--kind", ""], "kind must be a non-empty text"),
        (["limit", "--kind", "k"], "--kind needs a RATE"),
        (["limit", "--kind", "k", "20/x"], "'20/x' is not a rate"),
        (["limit", "--kind", "k", "0/s"], "a rate must be positive"),
        (["limit", "--kind", "k", "none", "--burst", "3"], "--burst needs a rate"),
        (["limit", "--kind", "k", "5", "--burst", "0"], "Invalid value for '--burst'"),
        (["limit", "--kind", "k", "5", "--concurrency", "2"], "--concurrency goes with --key"),
        (["limit", "--kind", "k", "--key", "t", "5"], "give --kind or --key, not both"),
        (["limit", "--key", "t"], "--key needs --concurrency N"),
        (["limit", "--key", "t", "--concurrency", "0"], "must be at least 1"),
        (["limit", "--key", "t", "--concurrency", "two"], "is not a whole number or none"),
        (["limit", "--key", "t", "5/s", "--concurrency", "2"], "--key takes --concurrency N"),
        (["limit", "20/s"], "a RATE needs --kind KIND"),
        (["limit", "--list", "--kind", "k"], "--list takes no other option"),
    ],
)
async def test_mistakes_are_one_line_and_change_nothing(database, conn, args, message) -> None:
    result = await run_cli(*args, dsn=database.dsn)
    assert result.exit_code == 2
    assert message in result.error_line()
    assert (
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM chunkd.kind_flow) + (SELECT count(*) FROM chunkd.events)"
            " + (SELECT count(*) FROM chunkd.concurrency_limits)"
        )
        == 0
    )


async def test_flow_targets_never_come_from_the_environment(database, conn) -> None:
    await create_job(conn, 2, kind="mail")
    result = await run_cli("pause", dsn=database.dsn, CHUNKD_KIND="mail")
    assert result.exit_code == 2 and "give a JOB id or --kind" in result.error_line()
    assert await conn.fetchval("SELECT count(*) FROM chunkd.kind_flow") == 0
