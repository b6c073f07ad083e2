"""The operator commands (enqueue, status, retry, cancel, reap, purge, workers) through click's
CliRunner against the real test database.

Each command runs ``chunkd.cli.main`` exactly as the console script does (so the one-line
"chunkd: error: ..." handling is under test too), inside CliRunner's isolation, on a worker
thread: the command starts its own event loop with uvloop.run, which cannot nest in the
session loop these async tests run on, while the tests keep using the ``conn`` fixture and
tests/sql_helpers.py to set up and check state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import structlog
from click.testing import CliRunner

from chunkd.cli import main
from sql_helpers import claim, complete, create_job, expire_leases, fail, status_counts


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The single stderr line of a user mistake (fails if there is more, e.g. a traceback)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one stderr line, got:\n{self.stderr}"
        assert lines[0].startswith("chunkd: error: "), lines[0]
        return lines[0].removeprefix("chunkd: error: ")


def _invoke(args: list[str], stdin: str | bytes | None, env: dict[str, str | None]) -> CliResult:
    runner = CliRunner()
    with runner.isolation(input=stdin, env={"COLUMNS": None, **env}) as (out, err, _):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


async def run_cli(
    *args: str, dsn: str | None = None, stdin: str | bytes | None = None, **env: str | None
) -> CliResult:
    """``chunkd ARGS`` with CHUNKD_DSN set to ``dsn``; extra keyword arguments are env vars."""
    full_env: dict[str, str | None] = {"CHUNKD_DSN": dsn, "DATABASE_URL": None, **env}
    return await asyncio.to_thread(_invoke, list(args), stdin, full_env)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``chunkd`` configures logging onto CliRunner's stdout, which is closed afterwards: put
    the test process's logging back so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


async def _job_count(conn) -> int:
    return await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs")


# ---------------------------------------------------------------------------------------------
# enqueue
# ---------------------------------------------------------------------------------------------


async def test_enqueue_json_array_from_file(database, conn, tmp_path) -> None:
    source = tmp_path / "chunks.json"
    source.write_text('[\n  {"page": 1},\n  {"page": 2},\n  "three",\n  [4]\n]\n')
    result = await run_cli("enqueue", "--kind", "mail", str(source), dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    job_id = uuid.UUID(result.stdout.strip())  # stdout is the job id and nothing else

    job = await conn.fetchrow("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job_id)
    assert (job["kind"], job["total_chunks"], job["payload"]) == ("mail", 4, {})
    assert (job["max_concurrency"], job["max_attempts"], job["priority"]) == (None, 3, 0)
    payloads = await conn.fetch(
        "SELECT seq, payload FROM chunkd.chunked_sync_jobs WHERE sync_job_id = $1 ORDER BY seq",
        job_id,
    )
    assert [(r["seq"], r["payload"]) for r in payloads] == [
        (0, {"page": 1}),
        (1, {"page": 2}),
        (2, "three"),
        (3, [4]),
    ]
    assert await status_counts(conn, job_id) == {"pending": 4}


async def test_enqueue_ndjson_from_stdin_with_options(database, conn) -> None:
    ndjson = '{"seq": "a"}\n\n{"seq": "b"}\r\n{"seq": "c"}\n'
    result = await run_cli(
        "enqueue",
        "--kind",
        "export",
        "--max-concurrency",
        "2",
        "--max-attempts",
        "5",
        "--priority",
        "-3",
        "--payload",
        '{"account": 42}',
        "-",
        dsn=database.dsn,
        stdin=ndjson,
    )
    assert result.exit_code == 0, result.stderr
    job_id = uuid.UUID(result.stdout.strip())
    job = await conn.fetchrow("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job_id)
    assert (job["kind"], job["payload"], job["total_chunks"]) == ("export", {"account": 42}, 3)
    assert (job["max_concurrency"], job["max_attempts"], job["priority"]) == (2, 5, -3)
    rows = await conn.fetch(
        "SELECT c.payload, q.max_attempts FROM chunkd.chunked_sync_jobs c "
        "JOIN chunkd.chunk_processing_queue q ON q.chunk_id = c.id "
        "WHERE c.sync_job_id = $1 ORDER BY c.seq",
        job_id,
    )
    assert [r["payload"] for r in rows] == [{"seq": "a"}, {"seq": "b"}, {"seq": "c"}]
    assert {r["max_attempts"] for r in rows} == {5}


async def test_enqueue_reads_every_option_from_the_environment(database, conn) -> None:
    # No FILE argument: the chunks come from (piped) stdin.
    result = await run_cli(
        "enqueue",
        dsn=database.dsn,
        stdin="[1, 2]",
        CHUNKD_KIND="env-kind",
        CHUNKD_MAX_CONCURRENCY="1",
        CHUNKD_MAX_ATTEMPTS="7",
        CHUNKD_PRIORITY="9",
        CHUNKD_PAYLOAD='{"from": "env"}',
    )
    assert result.exit_code == 0, result.stderr
    job = await conn.fetchrow(
        "SELECT * FROM chunkd.sync_jobs WHERE id = $1", uuid.UUID(result.stdout.strip())
    )
    assert (job["kind"], job["max_concurrency"], job["max_attempts"], job["priority"]) == (
        "env-kind",
        1,
        7,
        9,
    )
    assert job["payload"] == {"from": "env"}

    # DATABASE_URL is the last fallback for the DSN.
    result = await run_cli(
        "enqueue", "--kind", "k", dsn=None, stdin="[1]", DATABASE_URL=database.dsn
    )
    assert result.exit_code == 0, result.stderr
    assert await _job_count(conn) == 2


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        # A JSON array broken on its third line: the line and column as an editor shows them.
        (
            '[\n  {"a": 1},\n  {"a": 2} {"a": 3}\n]',
            "line 3: invalid JSON: Expecting ',' delimiter (column 12)",
        ),
        # NDJSON with a bad third line (the first two are fine and must not be inserted).
        (
            '{"a": 1}\n{"a": 2}\n{"a": 3,}\n{"a": 4}\n',
            "line 3: invalid JSON: Expecting property name enclosed in double quotes (column 9)",
        ),
        (
            '{"a": 1}\n{"a": 2}\n{"a": 3\n',
            "line 3: invalid JSON: Expecting ',' delimiter (column 8)",
        ),
        ("[1, NaN]", "invalid JSON: NaN is not valid JSON"),
        ('{\n  "chunks": [1, 2]\n}\n', "the input is an object spread over several lines"),
        ("[]", "the input array is empty: a job needs at least one chunk"),
        ("  \n\n", "the input is empty"),
        ("", "the input is empty"),
        (b"[1, \xff]", "line 1: input is not UTF-8 (byte offset 4)"),
        ('[{"x": "a\\u0000b"}]', "chunk 0 (0-based) contains \\u0000"),
    ],
    ids=[
        "json-line-3",
        "ndjson-line-3",
        "ndjson-unterminated",
        "nan",
        "non-array",
        "empty-array",
        "blank",
        "empty",
        "not-utf8",
        "nul",
    ],
)
async def test_enqueue_rejects_bad_input_with_one_line_and_inserts_nothing(
    database, conn, stdin: str | bytes, message: str
) -> None:
    result = await run_cli("enqueue", "--kind", "mail", "-", dsn=database.dsn, stdin=stdin)
    assert result.exit_code == 2
    assert result.error_line().startswith(message), result.stderr
    assert result.stdout == ""
    assert await _job_count(conn) == 0


async def test_enqueue_reports_the_sql_checks_as_one_line(database, conn) -> None:
    # Refused by chunkd.create_sync_job itself, not by the CLI: the SQL contract's message.
    result = await run_cli("enqueue", "--kind", "", "-", dsn=database.dsn, stdin="[1]")
    assert result.exit_code == 2
    assert result.error_line() == "kind must be a non-empty text of at most 200 characters"

    big = json.dumps({"blob": os.urandom(600 * 1024).hex()})  # ~1.2 MB, incompressible
    result = await run_cli(
        "enqueue", "--kind", "k", "--payload", big, "-", dsn=database.dsn, stdin="[1]"
    )
    assert result.exit_code == 2
    line = result.error_line()
    assert line.startswith("job payload is ") and line.endswith("above the limit of 1 MiB")

    result = await run_cli(
        "enqueue", "--kind", "k", "--payload", "{oops", "-", dsn=database.dsn, stdin="[1]"
    )
    assert result.exit_code == 2
    assert result.error_line() == (
        "--payload: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    )

    result = await run_cli(
        "enqueue", "--kind", "k", "--max-concurrency", "0", "-", dsn=database.dsn, stdin="[1]"
    )
    assert result.exit_code == 2
    assert "--max-concurrency" in result.error_line()

    result = await run_cli("enqueue", "--kind", "k", "/nonexistent/chunks.json", dsn=database.dsn)
    assert result.exit_code == 2
    assert "No such file or directory" in result.error_line()
    assert await _job_count(conn) == 0


async def test_enqueue_with_a_dedupe_key_prints_the_unfinished_jobs_id(database, conn) -> None:
    first = await run_cli(
        "enqueue", "--kind", "mail", "--dedupe-key", "ada", "-", dsn=database.dsn, stdin="[1, 2]"
    )
    assert first.exit_code == 0 and first.stderr == "", first.stderr
    again = await run_cli("enqueue", "--kind", "mail", "-", dsn=database.dsn, stdin="[3]",
                          CHUNKD_DEDUPE_KEY="ada")  # fmt: skip
    assert again.exit_code == 0
    assert again.stdout == first.stdout
    assert again.stderr == (
        "chunkd: an unfinished 'mail' job holds dedupe key 'ada': nothing created, its id printed\n"
    )
    other = await run_cli(
        "enqueue", "--kind", "export", "--dedupe-key", "ada", "-", dsn=database.dsn, stdin="[1]"
    )
    assert other.stdout != first.stdout and other.stderr == ""
    assert await _job_count(conn) == 2


async def test_enqueue_at_and_in_delay_the_job(database, conn) -> None:
    at = await run_cli(
        "enqueue", "--kind", "k", "--at", "2126-12-01T08:00:00+01:00", "-",
        dsn=database.dsn, stdin="[1]",
    )  # fmt: skip
    later = await run_cli("enqueue", "--kind", "k", "-", dsn=database.dsn, stdin="[1]",
                          CHUNKD_IN="15m")  # fmt: skip
    env_at = await run_cli("enqueue", "--kind", "k", "-", dsn=database.dsn, stdin="[1]",
                           CHUNKD_AT="2126-01-01T00:00:00Z")  # fmt: skip
    for result in (at, later, env_at):
        assert result.exit_code == 0, result.stderr
    rows = {
        str(r["id"]): r
        for r in await conn.fetch(
            "SELECT j.id, j.run_at, j.run_at - j.created_at AS delay, s.overall_status"
            " FROM chunkd.sync_jobs j"
            " JOIN chunkd.chunk_processing_status s ON s.parent_sync_job_id = j.id"
        )
    }
    assert {r["overall_status"] for r in rows.values()} == {"scheduled"}
    assert rows[at.stdout.strip()]["run_at"].isoformat() == "2126-12-01T07:00:00+00:00"
    assert rows[env_at.stdout.strip()]["run_at"].isoformat() == "2126-01-01T00:00:00+00:00"
    delay = rows[later.stdout.strip()]["delay"]
    assert timedelta(minutes=15) <= delay < timedelta(minutes=15, seconds=5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--at", "tomorrow"],
            "Invalid value for '--at': 'tomorrow' is not a timestamp: give ISO 8601 with a time"
            " zone, e.g. 2026-12-01T08:00:00Z",
        ),
        (
            ["--at", "2026-12-01T08:00:00"],
            "Invalid value for '--at': '2026-12-01T08:00:00' has no time zone: add Z (UTC) or an"
            " offset such as +01:00",
        ),
        (["--in", "soon"], "Invalid value for '--in': 'soon' is not a duration"),
        (
            ["--at", "2026-12-01T08:00:00Z", "--in", "5m"],
            "--at and --in both say when to start: give one of them",
        ),
        (["--dedupe-key", ""], "--dedupe-key must not be empty (leave it out for no key)"),
        (["--dedupe-key", "k" * 300], "dedupe_key must be at most 256 characters, got 300"),
    ],
    ids=["at-not-a-time", "at-naive", "in-not-a-duration", "at-and-in", "empty-key", "long-key"],
)
async def test_enqueue_refuses_bad_start_times_and_keys_and_inserts_nothing(
    database, conn, args: list[str], message: str
) -> None:
    result = await run_cli("enqueue", "--kind", "k", *args, "-", dsn=database.dsn, stdin="[1]")
    assert result.exit_code == 2
    assert result.error_line().startswith(message), result.stderr
    assert result.stdout == ""
    assert await _job_count(conn) == 0


async def test_connection_and_dsn_mistakes_are_one_line_without_the_password() -> None:
    result = await run_cli(
        "status", dsn="postgresql://chunkd:s3cret-pw@127.0.0.1:1/nowhere", stdin=None
    )
    assert result.exit_code == 75  # refused: worth trying again (EX_TEMPFAIL)
    line = result.error_line()
    assert line.startswith("cannot connect to postgresql://chunkd:***@127.0.0.1:1/nowhere")
    assert "s3cret-pw" not in result.stderr + result.stdout

    result = await run_cli("workers", dsn=None)
    assert result.exit_code == 2
    assert result.error_line() == (
        "no database given: pass --dsn, or set CHUNKD_DSN (or DATABASE_URL)"
    )


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------


async def _three_jobs(conn) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """An untouched job, a job in progress (1 done, 1 failed for good, 1 running, 1 pending),
    and a finished one; created in that order, so newest first is the reverse."""
    untouched = await create_job(conn, 2, kind="idle")
    busy = await create_job(conn, 4, kind="mail", priority=10)
    a, b, _c = await claim(conn, "w1", 3)
    await complete(conn, a["queue_id"], "w1", 1)
    await fail(conn, b["queue_id"], "w1", 1, "HTTP 404: mailbox gone", retryable=False)
    done = await create_job(conn, 1, kind="export", priority=20)
    (d,) = await claim(conn, "w1", 1)
    await complete(conn, d["queue_id"], "w1", 1)
    return untouched, busy, done


async def test_status_table_lists_jobs_newest_first_with_real_counts(database, conn) -> None:
    untouched, busy, done = await _three_jobs(conn)
    result = await run_cli("status", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header == [
        "job",
        "kind",
        "total",
        "pending",
        "processing",
        "completed",
        "failed",
        "cancelled",
        "status",
        "progress",
        "created",
    ]
    rows = [line.split() for line in lines[1:] if line.strip()]
    assert [r[:10] for r in rows] == [
        [str(done), "export", "1", "0", "0", "1", "0", "0", "completed", "100.00%"],
        [str(busy), "mail", "4", "1", "1", "1", "1", "0", "processing", "50.00%"],
        [str(untouched), "idle", "2", "2", "0", "0", "0", "0", "pending", "0.00%"],
    ]

    result = await run_cli("status", "--limit", "2", dsn=database.dsn)
    assert str(untouched) not in result.stdout
    assert "showing the newest 2 of 3 jobs" in result.stdout


async def test_status_json_for_scripts(database, conn) -> None:
    untouched, busy, done = await _three_jobs(conn)
    result = await run_cli("status", "--json", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    jobs = json.loads(result.stdout)
    assert [j["sync_job_id"] for j in jobs] == [str(done), str(busy), str(untouched)]
    by_id = {j["sync_job_id"]: j for j in jobs}
    assert by_id[str(busy)] | {"created_at": None, "started_at": None} == {
        "sync_job_id": str(busy),
        "kind": "mail",
        "total_chunks": 4,
        "pending_chunks": 1,
        "processing_chunks": 1,
        "completed_chunks": 1,
        "failed_chunks": 1,
        "cancelled_chunks": 0,
        "overall_status": "processing",
        "progress_percentage": 50.0,
        "created_at": None,
        "started_at": None,
        "finished_at": None,
        "run_at": None,
    }
    assert by_id[str(done)]["overall_status"] == "completed"
    assert by_id[str(done)]["finished_at"] is not None
    assert by_id[str(untouched)]["started_at"] is None

    # CHUNKD_JSON is --json.
    result = await run_cli("status", dsn=database.dsn, CHUNKD_JSON="1")
    assert len(json.loads(result.stdout)) == 3

    empty = await run_cli("status", "--json", "--limit", "0", dsn=database.dsn)
    assert len(json.loads(empty.stdout)) == 3


async def test_status_of_one_job_shows_errors_and_a_missing_worker(database, conn) -> None:
    _, busy, _ = await _three_jobs(conn)
    result = await run_cli("status", str(busy), dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert str(busy) in out and "50.00%" in out
    assert "4 total: 1 pending, 1 processing, 1 completed, 1 failed, 0 cancelled" in out
    assert "priority 10, max_concurrency unlimited, max_attempts 3" in out
    assert "HTTP 404: mailbox gone" in out  # from chunk_events
    assert "note: no live worker handles kind 'mail'" in out

    detail = json.loads((await run_cli("status", str(busy), "--json", dsn=database.dsn)).stdout)
    assert detail["pending_chunks"] == 1 and detail["failed_chunks"] == 1
    assert detail["live_worker_for_kind"] is False
    assert detail["note"] == "no live worker handles kind 'mail'"
    assert [(e["seq"], e["event"], e["attempt"], e["error"]) for e in detail["recent_errors"]] == [
        (1, "failed", 1, "HTTP 404: mailbox gone")
    ]

    # A live worker for the kind silences the note; a stale one does not.
    await conn.execute(
        "SELECT chunkd.register_worker('h:2:b', 'h', 2, '0.1.0', ARRAY['other', 'mail'], 4)"
    )
    detail = json.loads((await run_cli("status", str(busy), "--json", dsn=database.dsn)).stdout)
    assert detail["live_worker_for_kind"] is True and detail["note"] is None
    result = await run_cli("status", str(busy), dsn=database.dsn)
    assert "no live worker" not in result.stdout
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '10 minutes'"
    )
    result = await run_cli("status", str(busy), dsn=database.dsn)
    assert "note: no live worker handles kind 'mail'" in result.stdout


async def test_status_of_unknown_or_malformed_job_is_one_line(database, conn) -> None:
    missing = uuid.uuid4()
    result = await run_cli("status", str(missing), dsn=database.dsn)
    assert result.exit_code == 2
    assert result.error_line() == f"no sync job {missing}"

    result = await run_cli("status", "not-a-uuid", dsn=database.dsn)
    assert result.exit_code == 2
    assert "'not-a-uuid' is not a job id" in result.error_line()

    result = await run_cli("status", "--json", dsn=database.dsn)
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])
    result = await run_cli("status", dsn=database.dsn)
    assert (result.exit_code, result.stdout.strip()) == (0, "no sync jobs")


# ---------------------------------------------------------------------------------------------
# retry, cancel, reap, purge
# ---------------------------------------------------------------------------------------------


async def test_retry_puts_failed_chunks_back(database, conn) -> None:
    job = await create_job(conn, 3, max_attempts=1)
    rows = await claim(conn, "w", 3)
    for row in rows[:2]:
        await fail(conn, row["queue_id"], "w", 1, "boom", retryable=False)
    await complete(conn, rows[2]["queue_id"], "w", 1)

    result = await run_cli("retry", str(job), dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"retried 2 failed chunks of job {job}"
    assert await status_counts(conn, job) == {"pending": 2, "completed": 1}
    attempts = await conn.fetch(
        "SELECT attempts FROM chunkd.chunk_processing_queue "
        "WHERE parent_sync_job_id = $1 AND status = 'pending'",
        job,
    )
    assert [r["attempts"] for r in attempts] == [0, 0]

    result = await run_cli("retry", str(job), dsn=database.dsn)
    assert result.stdout.strip() == f"retried 0 failed chunks of job {job}"

    missing = uuid.uuid4()
    result = await run_cli("retry", str(missing), dsn=database.dsn)
    assert result.exit_code == 2 and result.error_line() == f"no sync job {missing}"
    result = await run_cli("retry", "12345", dsn=database.dsn)
    assert result.exit_code == 2 and "'12345' is not a job id" in result.error_line()


async def test_cancel_then_retry_is_refused(database, conn) -> None:
    job = await create_job(conn, 3)
    (running,) = await claim(conn, "w", 1)
    result = await run_cli("cancel", str(job), dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"cancelled 3 chunks of job {job}"
    assert await status_counts(conn, job) == {"cancelled": 3}
    # The worker still running the claimed chunk is fenced out.
    assert not await complete(conn, running["queue_id"], "w", 1)

    # Cancelling it again: the job is finished, and the operator is told so (issue #16, 9).
    result = await run_cli("cancel", str(job), dsn=database.dsn)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.error_line() == f"job {job} is already finished (cancelled): nothing to cancel"
    result = await run_cli("retry", str(job), dsn=database.dsn)
    assert result.exit_code == 2
    assert result.error_line() == f"sync job {job} is cancelled; its chunks cannot be retried"
    missing = uuid.uuid4()
    result = await run_cli("cancel", str(missing), dsn=database.dsn)
    assert result.exit_code == 2 and result.error_line() == f"no sync job {missing}"


@pytest.mark.parametrize("outcomes", [("completed",) * 2, ("completed", "failed")])
async def test_cancel_of_a_finished_job_says_so_and_changes_nothing(
    database, conn, outcomes: tuple[str, ...]
) -> None:
    job = await create_job(conn, len(outcomes), max_attempts=1)
    for row, outcome in zip(await claim(conn, "w", len(outcomes)), outcomes, strict=True):
        if outcome == "completed":
            assert await complete(conn, row["queue_id"], "w", row["attempt"])
        else:
            assert await fail(conn, row["queue_id"], "w", row["attempt"], "boom") == "failed"
    before = await status_counts(conn, job)
    result = await run_cli("cancel", str(job), dsn=database.dsn)
    status = "completed" if "failed" not in outcomes else "partial_failure"
    assert result.exit_code == 2 and result.stdout == ""
    assert result.error_line() == f"job {job} is already finished ({status}): nothing to cancel"
    assert await status_counts(conn, job) == before


async def test_reap_recovers_expired_leases(database, conn) -> None:
    job = await create_job(conn, 3)
    await claim(conn, "dead-worker", 2, lease=timedelta(minutes=5))
    result = await run_cli("reap", dsn=database.dsn)
    assert result.stdout.strip() == "reaped 0 chunks with an expired lease"
    await expire_leases(conn, job)
    result = await run_cli("reap", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "reaped 2 chunks with an expired lease"
    assert await status_counts(conn, job) == {"pending": 3}


async def test_purge_deletes_only_jobs_finished_long_enough_ago(database, conn) -> None:
    old = await create_job(conn, 2)
    for row in await claim(conn, "w", 2):
        await complete(conn, row["queue_id"], "w", 1)
    recent = await create_job(conn, 1)
    for row in await claim(conn, "w", 1):
        await complete(conn, row["queue_id"], "w", 1)
    unfinished = await create_job(conn, 1)
    await conn.execute(
        "UPDATE chunkd.jobs SET finished_at = now() - interval '8 days' WHERE public_id = $1", old
    )

    result = await run_cli("purge", "--older-than", "7d", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "purged 1 finished job"
    remaining = {r["id"] for r in await conn.fetch("SELECT id FROM chunkd.sync_jobs")}
    assert remaining == {recent, unfinished}
    assert (
        await conn.fetchval("SELECT count(*) FROM chunkd.chunk_events WHERE sync_job_id = $1", old)
        == 0
    )

    # CHUNKD_OLDER_THAN, and 0 = every finished job.
    result = await run_cli("purge", dsn=database.dsn, CHUNKD_OLDER_THAN="0")
    assert result.stdout.strip() == "purged 1 finished job"
    assert {r["id"] for r in await conn.fetch("SELECT id FROM chunkd.sync_jobs")} == {unfinished}

    # An age older than any time chunkd stores purges what exists that old (nothing), however
    # far back; past what Python's timedelta holds it is one line.
    result = await run_cli("purge", "--older-than", "999999999d", dsn=database.dsn)
    assert (result.exit_code, result.stdout.strip()) == (0, "purged 0 finished jobs"), result
    result = await run_cli("purge", "--older-than", "9" * 30 + "s", dsn=database.dsn)
    assert result.exit_code == 2
    assert "is too long (at most 999999999 days)" in result.error_line()
    assert "Traceback" not in result.stderr
    result = await run_cli("purge", "--older-than", "soon", dsn=database.dsn)
    assert result.exit_code == 2
    assert "'soon' is not a duration" in result.error_line()
    result = await run_cli("purge", dsn=database.dsn)
    assert result.exit_code == 2
    assert "--older-than" in result.error_line()


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------


async def test_workers_live_and_stale(database, conn) -> None:
    result = await run_cli("workers", dsn=database.dsn)
    assert (result.exit_code, result.stdout.strip()) == (0, "no registered workers")

    await conn.execute(
        "SELECT chunkd.register_worker('alpha:11:aa', 'alpha', 11, '0.1.0', ARRAY['mail'], 8)"
    )
    await conn.execute(
        "SELECT chunkd.register_worker('beta:22:bb', 'beta', 22, '0.1.0', "
        "ARRAY['export', 'mail'], 2)"
    )
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '5 minutes' "
        "WHERE worker_id = 'beta:22:bb'"
    )
    result = await run_cli("workers", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["worker", "host", "pid", "version", "kinds", "concurrency"]
    alpha = next(line for line in lines if line.startswith("alpha:11:aa"))
    beta = next(line for line in lines if line.startswith("beta:22:bb"))
    assert alpha.split()[:6] == ["alpha:11:aa", "alpha", "11", "0.1.0", "mail", "8"]
    assert alpha.rstrip().endswith("live")
    assert "export, mail" in beta and beta.rstrip().endswith("stale")
    assert "(5m00s ago)" in beta or "(5m01s ago)" in beta

    workers = json.loads((await run_cli("workers", "--json", dsn=database.dsn)).stdout)
    assert [(w["worker_id"], w["state"], w["kinds"], w["pid"]) for w in workers] == [
        ("alpha:11:aa", "live", ["mail"], 11),
        ("beta:22:bb", "stale", ["export", "mail"], 22),
    ]
    assert 299 <= workers[1]["heartbeat_age_s"] < 330

    # The threshold is an option (and CHUNKD_STALE_AFTER): 10 minutes makes beta live again.
    workers = json.loads(
        (await run_cli("workers", "--json", dsn=database.dsn, CHUNKD_STALE_AFTER="10m")).stdout
    )
    assert [w["state"] for w in workers] == ["live", "live"]
