"""The pages of ``chunkd web`` show what the database holds: jobs filtered and paged, a job's
chunk map, audit trail, errors and chart, workers live and stale with what they hold, the
queue by kind; and a read-only role is enough for all of it but the actions."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from chunkd.db import connect
from chunkd.web.settings import is_loopback
from sql_helpers import claim, complete, create_job, fail
from test_security import dsn_as
from web_helpers import csrf_of, serve

SECURITY_PAGE = Path(__file__).resolve().parents[1] / "docs" / "security.md"
ROW = re.compile(r'<tr data-job="([0-9a-f-]+)" data-status="(\w+)"')


def _rows(html: str) -> list[tuple[str, str]]:
    return ROW.findall(html)


async def test_jobs_are_listed_newest_first_filtered_and_paged(conn, database) -> None:
    older = [await create_job(conn, 2, kind="import") for _ in range(52)]
    mail = await create_job(conn, 3, kind="mail-sync", max_attempts=1)
    for row in await claim(conn, "w1", 3, kinds=["mail-sync"]):
        await fail(conn, row["queue_id"], "w1", row["attempt"], "boom", retryable=False)
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        first = (await http.get("/jobs")).text
        rows = _rows(first)
        assert len(rows) == 50 and rows[0] == (str(mail), "partial_failure")
        assert [r[0] for r in rows[1:]] == [str(j) for j in reversed(older)][:49]
        assert 'data-status="pending">pending <b>52</b>' in first
        assert 'data-status="partial_failure">partial failure <b>1</b>' in first
        assert "older →" in first

        second = _rows((await http.get("/jobs?page=2")).text)
        assert [r[0] for r in second] == [str(j) for j in reversed(older)][49:]

        failed = _rows((await http.get("/jobs?status=partial_failure")).text)
        assert failed == [(str(mail), "partial_failure")]
        imports = (await http.get("/jobs?kind=import&status=pending&part=rows")).text
        assert "<html" not in imports, "a fragment, not a page"
        assert len(_rows(imports)) == 50 and str(mail) not in imports
        assert _rows((await http.get("/jobs?kind=nothing-of-this-kind")).text) == []
        bogus = await http.get("/jobs?status=<script>&page=x")
        assert bogus.status_code == 200 and "<script>" not in bogus.text


async def test_job_page_shows_its_chunks_errors_and_audit_trail(conn, database) -> None:
    job = await create_job(conn, 6, kind="mail-sync", payload={"mailbox": "inbox"})
    rows = await claim(conn, "worker-a", 3)
    await complete(conn, rows[0]["queue_id"], "worker-a", rows[0]["attempt"])
    await fail(conn, rows[1]["queue_id"], "worker-a", rows[1]["attempt"], "IMAP timeout")
    # rows[2] stays processing; seq 3.. stay pending.
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        states = (await http.get(f"/api/jobs/{job}/chunks")).json()
        assert states["chunks"] == 6
        assert states["states"] == "cwrppp"  # completed, waiting for its retry, running, pending
        assert states["legend"]["w"] == "waiting"

        page = (await http.get(f"/jobs/{job}")).text
        assert 'data-chunks="6"' in page and 'id="chunk-map"' in page
        assert "IMAP timeout" in page and "worker-a" in page
        assert 'data-action="cancel"' in page and 'data-action="retry"' not in page
        assert "Throughput" in page and "<svg" in page
        assert "no live worker handles kind &#39;mail-sync&#39;" in page
        await conn.execute(
            "SELECT chunkd.register_worker('h:1:x', 'h', 1, '0.2.0', '{mail-sync}', 4)"
        )
        assert "no live worker" not in (await http.get(f"/jobs/{job}?part=summary")).text

        chunk = (await http.get(f"/jobs/{job}/chunks/1")).text
        events = re.findall(r"<td>(claimed|retry scheduled|enqueued)</td>", chunk)
        assert events == ["enqueued", "claimed", "retry scheduled"]
        assert "IMAP timeout" in chunk and "worker-a" in chunk
        assert (await http.get(f"/jobs/{job}/chunks/6")).status_code == 404
        assert (await http.get(f"/jobs/{uuid.uuid4()}")).status_code == 404
        assert (await http.get(f"/api/jobs/{uuid.uuid4()}/chunks")).status_code == 404


async def test_workers_live_and_stale_with_what_they_hold(conn, database) -> None:
    await create_job(conn, 5, kind="mail-sync")
    await create_job(conn, 2, kind="export")
    for worker, kinds in (("host-a:1:aaa", ["mail-sync"]), ("host-b:2:bbb", ["export"])):
        await conn.execute(
            "SELECT chunkd.register_worker($1, $2, $3, '0.2.0', $4, 8)",
            worker, worker.split(":")[0], 1, kinds,
        )  # fmt: skip
    await conn.execute(
        "UPDATE chunkd.workers SET last_heartbeat_at = now() - interval '10 minutes'"
        " WHERE worker_id = 'host-b:2:bbb'"
    )
    await claim(conn, "host-a:1:aaa", 3, kinds=["mail-sync"])
    await claim(conn, "host-b:2:bbb", 1, kinds=["export"])
    await fail(conn, (await claim(conn, "host-b:2:bbb", 1, kinds=["export"]))[0]["queue_id"],
               "host-b:2:bbb", 1, "later", retry_in=timedelta(hours=1))  # fmt: skip
    async with (
        serve(database.dsn, stale_after_s=60) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        page = (await http.get("/workers")).text
        live = dict(re.findall(r'data-worker="([^"]+)" data-live="(\d)"', page))
        assert live == {"host-a:1:aaa": "1", "host-b:2:bbb": "0"}
        cells = re.findall(r'<td class="num">(\d+)</td>', page)
        assert cells == ["8", "3", "8", "1"]  # concurrency, in flight; per worker
        assert "1 live, 1 stale" in page

        queue = (await http.get("/queue?part=table")).text
        by_kind = dict(
            re.findall(r'data-kind="([^"]+)"><td>[^<]+</td>((?:<td.*?</td>\s*)+)', queue)
        )
        numbers = {k: re.findall(r">(\d+)<", v) for k, v in by_kind.items()}
        # pending, paused, throttled, scheduled, processing
        assert numbers == {
            "export": ["0", "0", "0", "1", "1"],
            "mail-sync": ["2", "0", "0", "0", "3"],
        }
        assert 'data-status="pending">pending <b>2</b>' in queue
        assert 'data-status="processing">processing <b>4</b>' in queue


def _documented(role: str) -> tuple[list[str], list[str]]:
    """The SELECT and EXECUTE grants docs/security.md gives ``role``."""
    page = SECURITY_PAGE.read_text(encoding="utf-8")
    selects = re.search(rf"GRANT SELECT ON ((?:(?!GRANT).)*?)\s+TO {role};", page, re.DOTALL)
    executes = re.search(
        rf"GRANT EXECUTE ON FUNCTION\s+((?:(?!GRANT).)*?)\s+TO {role};", page, re.DOTALL
    )
    assert executes, f"docs/security.md grants nothing to {role}"
    tables = re.findall(r"chunkd\.(\w+)", selects[1]) if selects else []
    return tables, re.findall(r"chunkd\.(\w+\([^)]*\))", executes[1])


@pytest.fixture
async def web_roles(conn):  # type: ignore[no-untyped-def]
    reader = f"chunkd_webr_{uuid.uuid4().hex[:8]}"
    operator = f"chunkd_webo_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {reader} LOGIN")
    await conn.execute(f"CREATE ROLE {operator} LOGIN IN ROLE {reader}")
    await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {reader}")
    tables, functions = _documented("chunkd_web")
    assert "chunk_events" in tables
    assert "search_sync_jobs(text, text, text, int, int)" in functions
    for table in tables:
        await conn.execute(f"GRANT SELECT ON chunkd.{table} TO {reader}")
    for signature in functions:
        await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.{signature} TO {reader}")
    _, actions = _documented("chunkd_web_operator")
    assert actions == [
        "retry_failed_chunks(uuid)", "cancel_sync_job(uuid)", "pause_sync_job(uuid)",
        "resume_sync_job(uuid)", "pause_kind(text)", "resume_kind(text)",
    ]  # fmt: skip
    for signature in actions:
        await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.{signature} TO {operator}")
    yield reader, operator
    for role in (operator, reader):
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_a_read_only_role_runs_every_page_but_not_the_actions(
    conn, database, web_roles
) -> None:
    reader, operator = web_roles
    job = await create_job(conn, 3, max_attempts=1, payload={"a": 1})
    await conn.execute("SELECT chunkd.register_worker('h:1:x', 'h', 1, '0.2.0', '{test}', 4)")
    rows = await claim(conn, "h:1:x", 2)
    await fail(conn, rows[0]["queue_id"], "h:1:x", rows[0]["attempt"], "boom", retryable=False)
    reader_dsn = dsn_as(database.dsn, reader)
    check = await connect(reader_dsn)
    try:
        with pytest.raises(Exception, match="permission denied"):
            await check.execute("SELECT * FROM chunkd.jobs")
    finally:
        await check.close()

    async with serve(reader_dsn) as url, httpx.AsyncClient(base_url=url) as http:
        for path in (
            "/jobs", "/jobs?status=processing&kind=test", f"/jobs/{job}",
            f"/jobs/{job}?part=summary", f"/jobs/{job}?part=history", f"/jobs/{job}/payload",
            f"/jobs/{job}/chunks/0", f"/jobs/{job}/chunks/0/payload", f"/jobs/{job}/retry",
            f"/jobs/{job}/pause", "/workers", "/queue", f"/api/jobs/{job}",
            f"/api/jobs/{job}/chunks",
        ):  # fmt: skip
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text[-500:])
            assert "permission denied" not in response.text, path
        async with http.stream("GET", f"/api/jobs/{job}/events") as stream:
            first = await anext(stream.aiter_lines())
            assert first.startswith("retry:")
        confirm = await http.get(f"/jobs/{job}/retry")
        refused = await http.post(f"/jobs/{job}/retry", data={"csrf": csrf_of(confirm.text)})
        assert refused.status_code == 503
        # One line naming what is missing and the GRANT that fixes it (chunkd.db.server_errors).
        assert "may not execute chunkd.retry_failed_chunks" in refused.text
        assert f"GRANT EXECUTE ON FUNCTION chunkd.retry_failed_chunks(...) TO {reader};" in (
            refused.text
        ), "names the dashboard's role"
        confirm = await http.get(f"/jobs/{job}/pause")
        refused = await http.post(f"/jobs/{job}/pause", data={"csrf": csrf_of(confirm.text)})
        assert refused.status_code == 503
        assert "GRANT EXECUTE ON FUNCTION chunkd.pause_sync_job" in refused.text
    progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    assert progress["failed_chunks"] == 1, "nothing changed"
    assert progress["overall_status"] == "processing", "not paused"

    async with (
        serve(dsn_as(database.dsn, operator)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        confirm = await http.get(f"/jobs/{job}/retry")
        done = await http.post(f"/jobs/{job}/retry", data={"csrf": csrf_of(confirm.text)})
        assert done.status_code == 303
        progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        assert progress["failed_chunks"] == 0 and progress["pending_chunks"] == 2
        for action, status in (("pause", "paused"), ("resume", "processing")):
            confirm = await http.get(f"/jobs/{job}/{action}")
            done = await http.post(f"/jobs/{job}/{action}", data={"csrf": csrf_of(confirm.text)})
            assert done.status_code == 303, done.text[-300:]
            progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
            assert progress["overall_status"] == status


async def test_the_jobs_page_function_agrees_with_chunk_processing_status(conn) -> None:
    """sync_jobs_page (0003_web.sql) derives pending from the open attempts instead of
    counting the queue; in every state it must give the view's columns exactly."""
    await create_job(conn, 2, kind="untouched")
    running = await create_job(conn, 4, kind="running")
    [one, two] = await claim(conn, "w1", 2, kinds=["running"])
    await complete(conn, one["queue_id"], "w1", one["attempt"])
    await fail(conn, two["queue_id"], "w1", two["attempt"], "later")  # waiting for its retry
    finished = await create_job(conn, 2, kind="finished", max_attempts=1)
    for row in await claim(conn, "w1", 2, kinds=["finished"]):
        await fail(conn, row["queue_id"], "w1", row["attempt"], "boom", retryable=False)
    half = await create_job(conn, 3, kind="half")
    [first] = await claim(conn, "w1", 1, kinds=["half"])
    await complete(conn, first["queue_id"], "w1", first["attempt"])
    await claim(conn, "w1", 1, kinds=["half"])
    await conn.execute("SELECT chunkd.cancel_sync_job($1)", half)
    done = await create_job(conn, 1, kind="done")
    [last] = await claim(conn, "w1", 1, kinds=["done"])
    await complete(conn, last["queue_id"], "w1", last["attempt"])
    await conn.fetchval(
        "SELECT chunkd.create_sync_job('later', '[1]', run_at => now() + interval '1 hour')"
    )
    # Same columns, same order: the function's table is the view's row type.
    view = await conn.fetch("SELECT * FROM chunkd.chunk_processing_status ORDER BY created_at DESC")
    page = await conn.fetch("SELECT * FROM chunkd.sync_jobs_page(NULL, NULL, 100, 0)")
    assert list(page[0].keys()) == list(view[0].keys())
    assert [tuple(r) for r in page] == [tuple(r) for r in view]
    assert {r["overall_status"] for r in view} == {
        "pending", "processing", "partial_failure", "cancelled", "completed", "scheduled"
    }  # fmt: skip
    counts = dict(await conn.fetch("SELECT * FROM chunkd.sync_job_status_counts(NULL)"))
    assert counts == {"pending": 1, "processing": 1, "partial_failure": 1, "cancelled": 1,
                      "completed": 1, "scheduled": 1}  # fmt: skip
    only = await conn.fetch("SELECT * FROM chunkd.sync_jobs_page('running', 'processing')")
    assert [r["parent_sync_job_id"] for r in only] == [running]
    assert [r[0] for r in await conn.fetch(
        "SELECT parent_sync_job_id FROM chunkd.sync_jobs_page(NULL, NULL, 2, 2)")] == [
        half, finished]  # fmt: skip
    assert done


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True),
        ("[::1]", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
        ("example.com", False), ("", False),
    ],
)  # fmt: skip
def test_which_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
