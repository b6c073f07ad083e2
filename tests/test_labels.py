"""Job labels: set at enqueue through SQL (the job objects of ``create_sync_jobs`` and
``create_jobs``), the Python client on every driver (one job and many), ``chunkd enqueue
--label`` and ``chunkd.App.enqueue``; shown by the ``sync_jobs`` view,
``get_sync_job_progress``, the client's ``Progress`` and ``chunkd status JOB``; refused in one
line, with nothing written, when empty or longer than 200 characters."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

import chunkd
from test_cli_ops import _restore_logging, run_cli
from test_client import Client, client

__all__ = ["_restore_logging", "client"]  # fixtures, re-exported so they apply here too


async def _labels(conn: asyncpg.Connection) -> dict[uuid.UUID, str | None]:
    rows = await conn.fetch("SELECT id, label FROM chunkd.sync_jobs")
    return {r["id"]: r["label"] for r in rows}


async def test_a_label_set_through_sql_is_stored_and_shown(conn) -> None:
    labeled, plain = [
        r[0]
        for r in await conn.fetch(
            "SELECT * FROM chunkd.create_sync_jobs($1::jsonb)",
            json.dumps([
                {"kind": "mail", "chunks": [1], "label": "Invoice run 2026-12"},
                {"kind": "mail", "chunks": [1]},
            ]),
        )
    ]  # fmt: skip
    single = await conn.fetchval(
        "SELECT sync_job_id FROM chunkd.create_jobs($1::jsonb, true)",
        json.dumps([{"kind": "mail", "chunks": [1], "label": "tenant 42 / inbox"}]),
    )
    assert await _labels(conn) == {
        labeled: "Invoice run 2026-12", plain: None, single: "tenant 42 / inbox"
    }  # fmt: skip
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", labeled)
    assert progress["label"] == "Invoice run 2026-12"
    assert (await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", plain))["label"] is None


@pytest.mark.parametrize(("label", "length"), [("", 0), ("x" * 201, 201)])
async def test_an_empty_or_long_label_is_one_line_and_writes_nothing(
    conn, label: str, length: int
) -> None:
    jobs = [{"kind": "k", "chunks": [1]}, {"kind": "k", "chunks": [1], "label": label}]
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.fetch("SELECT chunkd.create_sync_jobs($1::jsonb)", json.dumps(jobs))
    assert str(refused.value) == (
        "chunkd: jobs[1]: label must be NULL (no label) or a non-empty text of at most 200 "
        f"characters, got {length} characters"
    )
    assert await _labels(conn) == {}
    # The table refuses it too, whoever writes it.
    with pytest.raises(asyncpg.CheckViolationError, match="jobs_label_length"):
        await conn.execute(
            "INSERT INTO chunkd.jobs (kind, total_chunks, label) VALUES ('k', 1, $1)", label
        )


async def test_the_client_sets_a_label_and_progress_returns_it(client: Client, conn) -> None:
    job = await client.call("create_sync_job", "mail", [1, 2], label="Invoice run", priority=3)
    plain = await client.call("create_sync_job", "mail", [1])
    [bulk, bare] = await client.call(
        "create_sync_jobs",
        [{"kind": "mail", "chunks": [1], "label": "bulk one"}, {"kind": "mail", "chunks": [1]}],
    )
    assert await _labels(conn) == {job: "Invoice run", plain: None, bulk: "bulk one", bare: None}
    progress = await client.call("get_progress", job)
    assert (progress.label, progress.total_chunks) == ("Invoice run", 2)
    assert await conn.fetchval("SELECT priority FROM chunkd.sync_jobs WHERE id = $1", job) == 3
    assert (await client.call("get_progress", plain)).label is None
    with pytest.raises(chunkd.InvalidInputError, match=r"^label must be NULL .* got 0 characters"):
        await client.call("create_sync_job", "mail", [1], label="")
    with pytest.raises(chunkd.InvalidInputError, match=r"^label must be a str, got int"):
        await client.call("create_sync_job", "mail", [1], label=7)
    assert len(await _labels(conn)) == 4


async def test_a_labeled_job_keeps_every_other_option(client: Client, conn) -> None:
    """The labeled path writes what create_sync_job writes, dedupe key included."""
    job = await client.call(
        "create_sync_job", "mail", [1], payload={"box": "inbox"}, max_concurrency=1,
        max_attempts=5, dedupe_key="ada", concurrency_key="t-1", max_per_second=2,
        on_finish_kind="done", label="first",
    )  # fmt: skip
    again = await client.call("create_sync_job", "mail", [2], dedupe_key="ada", label="second")
    assert again == job, "the unfinished job holding the key, with its own label"
    row = await conn.fetchrow("SELECT * FROM chunkd.sync_jobs WHERE id = $1", job)
    assert dict(row) | {"id": None, "created_at": None} == {
        "id": None, "kind": "mail", "payload": {"box": "inbox"}, "max_concurrency": 1,
        "max_attempts": 5, "priority": 0, "total_chunks": 1, "cancelled_at": None,
        "created_at": None, "started_at": None, "finished_at": None, "run_at": None,
        "dedupe_key": "ada", "paused_at": None, "max_per_second": 2, "concurrency_key": "t-1",
        "label": "first",
    }  # fmt: skip
    assert (await client.call("get_progress", job)).on_finish_kind == "done"


async def test_chunkd_enqueue_label_and_status_show_it(database, conn) -> None:
    result = await run_cli(
        "enqueue", "--kind", "mail", "--label", "[red]nightly[/red] import", "-",
        dsn=database.dsn, stdin="[1, 2]",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    job = uuid.UUID(result.stdout.strip())
    assert await _labels(conn) == {job: "[red]nightly[/red] import"}
    detail = await run_cli("status", str(job), dsn=database.dsn)
    assert "label     [red]nightly[/red] import" in detail.stdout, detail.stdout
    as_json = json.loads((await run_cli("status", str(job), "--json", dsn=database.dsn)).stdout)
    assert as_json["label"] == "[red]nightly[/red] import"

    empty = await run_cli("enqueue", "--kind", "mail", "--label", "", "-", dsn=database.dsn,
                          stdin="[1]")  # fmt: skip
    assert empty.exit_code == 2
    assert empty.error_line() == "--label must not be empty (leave it out for no label)"
    long = await run_cli("enqueue", "--kind", "mail", "--label", "x" * 201, "-",
                         dsn=database.dsn, stdin="[1]")  # fmt: skip
    assert long.exit_code == 2 and "got 201 characters" in long.error_line()
    assert len(await _labels(conn)) == 1


@dataclass
class Page:
    n: int


app = chunkd.App()


@app.handler("page", payload=Page)
async def page(chunk: chunkd.Chunk[Page, Any]) -> None:
    pass


async def test_app_enqueue_takes_a_label(conn) -> None:
    job = await app.enqueue(conn, "page", [Page(1), Page(2)], label="pages of ada")
    assert await _labels(conn) == {job: "pages of ada"}
    assert (await chunkd.get_progress(conn, job)).label == "pages of ada"
