"""The jobs page's search and a kind's page: one box matches the start of a job's id, kind,
label or dedupe key (ignoring case) through indexes, a search that cannot be run is one line
and status 400, and a kind is paused and resumed from its page (the jobs page filtered by the
kind) behind a confirmation, CSRF and the role's grant."""

from __future__ import annotations

import html
import json
import re
import uuid
from typing import Any

import httpx
import pytest

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations
from sql_helpers import claim, create_job
from test_security import dsn_as
from test_web_pages import web_roles
from web_helpers import csrf_of, serve

__all__ = ["web_roles"]  # the fixture, re-exported so it applies here too

ROW = re.compile(r'<tr data-job="([0-9a-f-]+)"')


def _ids(page: str) -> set[str]:
    return set(ROW.findall(page))


async def _jobs(conn: Any, specs: list[dict[str, Any]]) -> list[str]:
    rows = await conn.fetch("SELECT * FROM chunkd.create_sync_jobs($1::jsonb)", json.dumps(specs))
    return [str(r[0]) for r in rows]


async def test_one_box_finds_jobs_by_id_kind_label_or_dedupe_key(conn, database) -> None:
    invoice, tenant, weekly, archive, other = await _jobs(conn, [
        {"kind": "Mail-Sync", "chunks": [1], "label": "Invoice run 2026-12"},
        {"kind": "export", "chunks": [1], "dedupe_key": "Tenant-42"},
        {"kind": "feed", "chunks": [1], "label": "weekly digest"},
        {"kind": "mail-archive", "chunks": [1]},
        {"kind": "import", "chunks": [1], "label": "nothing alike"},
    ])  # fmt: skip
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:

        async def found(query: str, **params: str) -> set[str]:
            response = await http.get("/jobs", params={"q": query, **params})
            assert response.status_code == 200, response.text[-300:]
            return _ids(response.text)

        assert await found("invoice") == {invoice}, "a label's start, any case"
        assert await found("  INV ") == {invoice}, "trimmed"
        assert await found("mail") == {invoice, archive}, "a kind's start, any case"
        assert await found("mail", kind="mail-archive") == {archive}, "within the kind filter"
        assert await found("mail", status="completed") == set()
        assert await found("tenant-4") == {tenant}, "a dedupe key's start"
        assert await found("week") == {weekly}
        assert await found("digest") == set(), "the start only"
        assert await found("zzz") == set()
        # The start of a job id: as printed (dashes where an id has them), without its
        # dashes, in capitals, and whole.
        assert invoice in await found(invoice[:8])
        assert await found(invoice[:13]) == {invoice}
        assert await found(invoice.replace("-", "")[:20].upper()) == {invoice}
        assert await found(invoice) == {invoice}
        assert await found(invoice[:4] + "-" + invoice[4:8]) == set(), "not an id: a text"

        page = (await http.get("/jobs", params={"q": "invoice"})).text
        assert (
            '<span class="label" data-label title="Invoice run 2026-12">Invoice run 2026-12</span>'
            in page
        ), "the label is shown"
        assert 'data-status="pending">pending <b>' not in page, "no counts of all jobs"
        assert "No jobs match this search" in (await http.get("/jobs?q=zzz")).text
        rows = await http.get("/jobs", params={"q": "tenant", "part": "rows"})
        assert "<html" not in rows.text and _ids(rows.text) == {tenant}
        assert "Tenant-42" in rows.text, "the dedupe key a search matched is shown"
        everything = (await http.get("/jobs")).text
        assert _ids(everything) == {invoice, tenant, weekly, archive, other}
        assert (
            '<span class="label" data-label title="nothing alike">nothing alike</span>'
            in everything
        )
        assert 'data-status="pending">pending <b>5</b>' in everything


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("x" * 257, "a search is at most 256 characters (the start of a kind, a label, a dedupe "
         "key or a job id), got 257"),
        ("a\x00b", "a search cannot contain a NUL character (no kind, label or dedupe key can)"),
    ],
)  # fmt: skip
async def test_a_search_that_cannot_run_is_one_line(conn, database, query: str, message) -> None:
    await create_job(conn, 1)
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        for part in ({}, {"part": "rows"}):
            response = await http.get("/jobs", params={"q": query, **part})
            assert response.status_code == 400
            alerts = re.findall(r'<p class="error" role="alert"[^>]*>([^<]*)</p>', response.text)
            assert [html.unescape(a) for a in alerts] == [message]
            assert "Traceback" not in response.text and _ids(response.text) == set()
    with pytest.raises(Exception, match="a search is at most 256 characters") as refused:
        await conn.fetch("SELECT * FROM chunkd.search_sync_jobs(repeat('x', 257))")
    assert getattr(refused.value, "sqlstate", None) == "22023"


async def _scans(conn: Any) -> dict[str, int]:
    """Index scans of chunkd.jobs' indexes and sequential scans of the table, flushed."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT indexrelname AS name, idx_scan AS n FROM pg_stat_user_indexes"
        " WHERE schemaname = 'chunkd' AND relname = 'jobs'"
        " UNION ALL SELECT 'seq_scan', seq_scan FROM pg_stat_user_tables"
        " WHERE schemaname = 'chunkd' AND relname = 'jobs'"
    )
    return {r["name"]: r["n"] for r in rows}


async def test_the_search_reads_indexes_never_the_whole_table(conn) -> None:
    """20,000 jobs: a prefix of a label, a dedupe key, a rare kind or an id is read from its
    index, as uuid and text ranges, with no sequential scan of chunkd.jobs."""
    await conn.execute(
        "INSERT INTO chunkd.jobs (kind, total_chunks, label, dedupe_key)"
        " SELECT CASE WHEN g = 777 THEN 'rare-kind' ELSE 'kind-' || g % 20 END, 1,"
        "        CASE WHEN g % 10 = 0 THEN 'tenant ' || g END,"
        "        CASE WHEN g % 7 = 0 THEN 'key-' || g END"
        " FROM generate_series(1, 20000) g"
    )
    await conn.execute("ANALYZE chunkd.jobs")
    some_id = str(await conn.fetchval("SELECT public_id FROM chunkd.jobs WHERE id = 4321"))
    searches = {
        "jobs_label_search": ("Tenant 1234", 1),
        "jobs_dedupe_key_search": ("KEY-7007", 1),
        "jobs_kind_search": ("rare", 1),
        "jobs_public_id_key": (some_id[:13], 1),
    }
    for index, (query, expected) in searches.items():
        before = await _scans(conn)
        rows = await conn.fetch("SELECT * FROM chunkd.search_sync_jobs($1)", query)
        after = await _scans(conn)
        assert len(rows) >= expected, query
        assert after[index] > before[index], f"{query!r} did not read {index}"
        assert after["seq_scan"] == before["seq_scan"], f"{query!r} read the whole table"
    [row] = await conn.fetch("SELECT * FROM chunkd.search_sync_jobs($1)", some_id)
    assert str(row["parent_sync_job_id"]) == some_id


async def test_pause_and_resume_a_kind_from_its_page(conn, database) -> None:
    mail = await create_job(conn, 3, kind="mail sync")
    await create_job(conn, 2, kind="other")

    async def paused_at() -> Any:
        return await conn.fetchval(
            "SELECT paused_at FROM chunkd.kind_flow WHERE kind = 'mail sync'"
        )

    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        page = (await http.get("/jobs", params={"kind": "mail sync"})).text
        assert 'data-kind-state="running"' in page
        assert 'href="/kinds/pause?kind=mail+sync" data-action="kind-pause"' in page
        assert 'data-action="kind-resume"' not in page
        assert "1 unfinished job(s): 3 pending and 0 processing chunk(s)" in page

        confirm = await http.get("/kinds/pause", params={"kind": "mail sync"})
        assert confirm.status_code == 200
        assert "Pause kind mail sync, for its 1 unfinished job(s)" in confirm.text
        assert "None of its 3 pending chunk(s) is claimed" in confirm.text
        assert await paused_at() is None, "the confirmation changes nothing"
        csrf = csrf_of(confirm.text)
        refused = await http.post("/kinds/pause?kind=mail+sync", data={})
        assert refused.status_code == 403 and await paused_at() is None
        cross_site = await http.post(
            "/kinds/pause?kind=mail+sync",
            data={"csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert cross_site.status_code == 403 and await paused_at() is None

        done = await http.post("/kinds/pause?kind=mail+sync", data={"csrf": csrf})
        assert done.status_code == 303
        assert done.headers["location"] == "/jobs?kind=mail+sync&done=pause&n=3"
        assert await paused_at() is not None
        assert {r["kind"] for r in await claim(conn, "w", 10)} == {"other"}, "held back"
        page = (await http.get(done.headers["location"])).text
        assert "kind paused: 3 pending chunk(s) held back" in page
        assert 'data-kind-state="paused"' in page and 'data-note="kind-paused"' in page
        assert 'data-action="kind-resume"' in page and 'data-action="kind-pause"' not in page
        job_page = (await http.get(f"/jobs/{mail}")).text
        assert "the kind's page</a> resumes it" in job_page
        again = await http.get("/kinds/pause", params={"kind": "mail sync"})
        assert "This does not apply to the kind as it is now" in again.text

        confirm = await http.get("/kinds/resume", params={"kind": "mail sync"})
        assert "Resume kind mail sync? Its 3 pending chunk(s)" in confirm.text
        done = await http.post("/kinds/resume?kind=mail+sync", data={"csrf": csrf_of(confirm.text)})
        assert done.headers["location"] == "/jobs?kind=mail+sync&done=resume&n=3"
        assert await paused_at() is None
        assert len(await claim(conn, "w", 10)) == 3

        assert (await http.get("/kinds/stop?kind=x")).status_code == 404
        nameless = await http.get("/kinds/pause")
        assert nameless.status_code == 400
        assert "give the kind as ?kind=NAME (1-200 characters)" in nameless.text


async def test_the_read_only_role_searches_but_may_not_pause_a_kind(
    conn, database, web_roles
) -> None:
    reader, operator = web_roles
    await _jobs(conn, [{"kind": "test", "chunks": [1, 2], "label": "labelled"}])
    async with serve(dsn_as(database.dsn, reader)) as url, httpx.AsyncClient(base_url=url) as http:
        for path in ("/jobs?q=lab", "/jobs?kind=test", "/jobs?kind=test&q=te&part=rows",
                     "/kinds/pause?kind=test"):  # fmt: skip
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text[-300:])
            assert "permission denied" not in response.text
        assert (
            '<span class="label" data-label title="labelled">labelled</span>'
            in (await http.get("/jobs?q=lab")).text
        )
        confirm = await http.get("/kinds/pause?kind=test")
        refused = await http.post("/kinds/pause?kind=test", data={"csrf": csrf_of(confirm.text)})
        assert refused.status_code == 503
        assert "may not execute chunkd.pause_kind" in refused.text
        assert f"GRANT EXECUTE ON FUNCTION chunkd.pause_kind(...) TO {reader};" in refused.text
    assert await conn.fetchval("SELECT count(*) FROM chunkd.kind_flow") == 0, "nothing changed"

    async with (
        serve(dsn_as(database.dsn, operator)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for action, paused in (("pause", True), ("resume", False)):
            confirm = await http.get(f"/kinds/{action}?kind=test")
            done = await http.post(
                f"/kinds/{action}?kind=test", data={"csrf": csrf_of(confirm.text)}
            )
            assert done.status_code == 303, done.text[-300:]
            state = await conn.fetchval("SELECT paused_at FROM chunkd.kind_state('test')")
            assert (state is not None) == paused


async def test_upgrading_gives_the_dashboard_role_the_search(empty_database) -> None:
    """A read-only dashboard role of schema version 14 may call what the jobs page calls now."""
    last = next(m.version for m in migrations() if m.name == "labels") - 1
    role = f"chunkd_websearch_{uuid.uuid4().hex[:8]}"
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=last)
        await conn.execute(f"CREATE ROLE {role}")
        await conn.execute(
            f"GRANT EXECUTE ON FUNCTION chunkd.sync_jobs_page(text, text, int, int) TO {role}"
        )
        await apply_migrations(conn)
        privileges = await conn.fetchrow(
            "SELECT has_function_privilege($1,"
            "   'chunkd.search_sync_jobs(text,text,text,int,int)', 'EXECUTE') AS search,"
            " has_function_privilege($1, 'chunkd.kind_state(text)', 'EXECUTE') AS kind,"
            " has_function_privilege($1, 'chunkd.pause_kind(text)', 'EXECUTE') AS pause,"
            " has_function_privilege('public', 'chunkd.kind_state(text)', 'EXECUTE') AS public",
            role,
        )
        assert dict(privileges) == {"search": True, "kind": True, "pause": False, "public": False}
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
