"""The dashboard shows flow control and jobs that grow: the statuses ``paused`` and
``scheduled``, the controls in effect on a job (its pause and rate, its key's limit, its kind's
pause and rate), a delayed job's start, an open or growing job's total that is not final, the
``job_finished`` event, and the queue's ``paused`` and ``throttled`` chunks by kind; its two
functions of schema version 7 (``job_flow``, ``queue_depth_by_kind``) agree with the tables."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import migrations, queries
from sql_helpers import claim, complete, create_job
from web_helpers import csrf_of, serve

ROW = re.compile(r'<tr data-job="([0-9a-f-]+)" data-status="(\w+)"')


def _flow_items(html: str) -> dict[str, str]:
    """The job page's flow-control lines by their data-flow name, tags stripped."""
    items = re.findall(r'<li data-flow="([\w-]+)">(.*?)</li>', html, re.DOTALL)
    return {name: " ".join(re.sub(r"<[^>]+>", "", text).split()) for name, text in items}


def _notes(html: str) -> dict[str, str]:
    notes = re.findall(r'data-note="([\w-]+)">(.*?)</p>', html, re.DOTALL)
    return {name: " ".join(re.sub(r"<[^>]+>", "", text).split()) for name, text in notes}


async def _sql(conn: Any, query: str, *args: Any) -> Any:
    return await conn.fetchval(query, *args)


async def test_flow_controls_delayed_open_and_growing_jobs_are_shown(conn, database) -> None:
    await conn.execute("SELECT chunkd.set_rate_limit('gmail-sync', 350, burst => 100)")
    await conn.execute("SELECT chunkd.set_concurrency_limit('customer-17', 4)")
    limited = await create_job(
        conn, 3, kind="gmail-sync", max_per_second=4, concurrency_key="customer-17"
    )
    assert len(await claim(conn, "w1", 1, kinds=["gmail-sync"])) == 1
    delayed = await _sql(
        conn, "SELECT chunkd.create_sync_job('report', '[1, 2]', run_at => now() + '1 hour')"
    )
    opened = await _sql(conn, "SELECT chunkd.create_sync_job('import', '[]', open => true)")
    await conn.execute('SELECT chunkd.append_chunks($1, \'[{"file": "a.csv"}]\')', opened)
    growing = await create_job(conn, 1, kind="pages")
    [first] = await claim(conn, "w1", 1, kinds=["pages"])
    appended = await _sql(
        conn,
        "SELECT chunkd.complete_chunk_and_append($1, 'w1', $2, '{}', '[{\"page\": 2}]')",
        first["queue_id"], first["attempt"],
    )  # fmt: skip
    assert appended == 1
    held = await create_job(conn, 2, kind="mail")
    await conn.execute("SELECT chunkd.pause_sync_job($1)", held)
    quiet = await create_job(conn, 2, kind="quiet")
    await conn.execute("SELECT chunkd.pause_kind('quiet')")

    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        jobs = (await http.get("/jobs")).text
        assert 'data-status="paused">paused <b>2</b>' in jobs
        assert 'data-status="scheduled">scheduled <b>1</b>' in jobs
        statuses = dict(ROW.findall(jobs))
        assert statuses[str(held)] == "paused" and statuses[str(delayed)] == "scheduled"
        assert statuses[str(limited)] == "processing" and statuses[str(opened)] == "pending"
        assert re.search(r"starts in (59m \d\ds|1h 00m)", jobs), "a delayed job says when"
        assert '<span class="badge st-paused">paused</span>' in jobs
        assert '<option value="paused"' in jobs and '<option value="scheduled"' in jobs
        paused_only = ROW.findall((await http.get("/jobs?status=paused")).text)
        assert sorted(paused_only) == sorted([(str(held), "paused"), (str(quiet), "paused")])
        assert ROW.findall((await http.get("/jobs?status=scheduled&part=rows")).text) == [
            (str(delayed), "scheduled")
        ]

        page = (await http.get(f"/jobs/{limited}")).text
        flow = _flow_items(page)
        assert flow.keys() == {"job-rate", "key", "kind-rate"}, flow
        assert flow["job-rate"].startswith("job rate 4/s (burst 2;")
        assert flow["key"] == (
            "concurrency key customer-17: at most 4 at once over its jobs, 1 processing now"
        )
        assert flow["kind-rate"].startswith("kind gmail-sync rate 350/s (burst 100;")
        assert 'data-setting="max_per_second">4/s<' in page
        assert "customer-17" in re.search(r'data-setting="concurrency_key">(.*?)</dd>', page)[1]
        assert 'data-action="pause"' in page and 'data-action="resume"' not in page

        page = (await http.get(f"/jobs/{delayed}?part=summary")).text
        assert '<span class="badge st-scheduled">scheduled</span>' in page
        scheduled = _notes(page)["scheduled"]
        assert re.match(r"Starts at \S+ \S+, in (59m \d\ds|1h 00m): its chunks wait", scheduled)
        assert 'data-setting="run_at">' in (await http.get(f"/jobs/{delayed}")).text

        page = (await http.get(f"/jobs/{opened}?part=summary")).text
        assert _notes(page).keys() == {"open"}
        assert "(1 so far) is not final" in _notes(page)["open"]
        assert "for the chunks known now" in page

        page = (await http.get(f"/jobs/{growing}")).text
        assert _notes(page)["growing"].startswith("Growing: its chunks appended 1 chunk(s)")
        assert "2 (1 appended by its chunks), not final" in page

        page = (await http.get(f"/jobs/{held}")).text
        assert _notes(page).keys() == {"paused"}
        assert _flow_items(page) == {}, "a pause is a note, not a line of the flow controls"
        assert ">ETA paused<" in page.replace("· ", "")
        assert 'data-action="resume"' in page and 'data-action="pause"' not in page
        assert re.search(r'<tr data-event="paused"><td>[^<]+</td><td>paused</td>', page)

        page = (await http.get(f"/jobs/{quiet}")).text
        assert _notes(page).keys() == {"kind-paused"}
        assert "chunkd resume --kind quiet" in _notes(page)["kind-paused"]
        assert _flow_items(page) == {}
        # The job itself is not paused: it may be paused on its own, not resumed.
        assert 'data-action="pause"' in page and 'data-action="resume"' not in page


async def test_the_job_finished_event_and_its_follow_up_job(conn, database) -> None:
    job = await _sql(
        conn, "SELECT chunkd.create_sync_job('sync', '[{}]', on_finish_kind => 'synced')"
    )
    [row] = await claim(conn, "w1", 1, kinds=["sync"])
    await complete(conn, row["queue_id"], "w1", row["attempt"])
    follow_up = await _sql(conn, "SELECT j.id FROM chunkd.sync_jobs j WHERE j.kind = 'synced'")
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        page = (await http.get(f"/jobs/{job}")).text
        finished = re.search(r'<tr data-event="job_finished">(.*?)</tr>', page, re.DOTALL)
        assert finished, "the job_finished event is in the job's history"
        text = " ".join(re.sub(r"<[^>]+>", " ", finished[1]).split())
        assert "job finished completed" in text
        assert "1 completed, 0 failed, 0 cancelled of 1" in text
        assert f'href="/jobs/{follow_up}"' in finished[1]
        assert 'data-setting="on_finish_kind">a follow-up job of kind synced<' in page
        assert "Flow control" not in page and 'data-note="' not in page


async def test_the_queue_shows_paused_and_throttled_chunks_by_kind(conn, database) -> None:
    await create_job(conn, 2, kind="plain")
    await conn.execute("SELECT chunkd.set_rate_limit('limited', 5)")
    await create_job(conn, 3, kind="limited")
    await create_job(conn, 2, kind="tenant", concurrency_key="t-1")
    await conn.execute("SELECT chunkd.set_concurrency_limit('t-1', 1)")
    paused = await create_job(conn, 4, kind="tenant")
    await conn.execute("SELECT chunkd.pause_sync_job($1)", paused)
    await create_job(conn, 1, kind="held")
    await conn.execute("SELECT chunkd.pause_kind('held')")
    await conn.execute(
        "SELECT chunkd.create_sync_job('later', '[1, 2]', run_at => now() + '1 hour')"
    )
    assert len(await claim(conn, "w1", 1, kinds=["plain"])) == 1
    expected = {
        "held": {"paused": 1},
        "later": {"scheduled": 2},
        "limited": {"throttled": 3},
        "plain": {"pending": 1, "processing": 1},
        "tenant": {"throttled": 2, "paused": 4},
    }
    by_kind: dict[str, dict[str, int]] = {}
    for r in await conn.fetch("SELECT * FROM chunkd.queue_depth_by_kind()"):
        by_kind.setdefault(r["kind"], {})[r["status"]] = r["chunks"]
    assert by_kind == expected
    totals = dict(await conn.fetch("SELECT status, chunks FROM chunkd.queue_depth()"))
    summed = {s: sum(k.get(s, 0) for k in by_kind.values()) for s in totals}
    assert summed == totals, "the two functions classify alike"

    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        queue = (await http.get("/queue?part=table")).text
        header = re.findall(r'<th class="num">(\w+)</th>', queue)
        assert header == ["Pending", "Paused", "Throttled", "Scheduled", "Processing"]
        rows = re.findall(r'data-kind="([^"]+)"><td>[^<]+</td>(.*?)</tr>', queue)
        shown = {kind: [int(n) for n in re.findall(r">(\d+)<", cells)] for kind, cells in rows}
        columns = ["pending", "paused", "throttled", "scheduled", "processing"]
        assert shown == {k: [v.get(c, 0) for c in columns] for k, v in expected.items()}
        for status, n in (("paused", 5), ("throttled", 5), ("scheduled", 2), ("pending", 1)):
            assert f'data-status="{status}">{status} <b>{n}</b>' in queue
        workers = (await http.get("/workers")).text
        assert 'data-status="throttled">throttled <b>5</b>' in workers
        assert "paused and throttled chunks wait for a resume or for their limit" in workers


async def test_job_flow_reads_what_the_cli_reads(conn) -> None:
    """job_flow(uuid) gives the dashboard's role what ops_job_settings reads from the tables
    (chunkd status JOB): the same controls, for jobs under each of them and for none."""
    await conn.execute("SELECT chunkd.set_rate_limit('k', 20, burst => 7)")
    await conn.execute("SELECT chunkd.set_concurrency_limit('key-a', 3)")
    jobs = [
        await create_job(conn, 2, kind="k", max_per_second=4, concurrency_key="key-a"),
        await create_job(conn, 2, kind="other", concurrency_key="key-b"),
        await create_job(conn, 2, kind="other"),
    ]
    await conn.execute("SELECT chunkd.pause_sync_job($1)", jobs[2])
    await conn.execute("SELECT chunkd.pause_kind('k')")
    columns = {
        "paused_at": "paused_at", "max_per_second": "max_per_second", "burst": "job_burst",
        "concurrency_key": "concurrency_key", "key_max_concurrency": "key_max_concurrency",
        "kind_paused_at": "kind_paused_at", "kind_per_second": "kind_per_second",
        "kind_burst": "kind_burst",
    }  # fmt: skip
    for job in jobs:
        [flow] = await conn.fetch("SELECT * FROM chunkd.job_flow($1)", job)
        cli = await conn.fetchrow(queries()["ops_job_settings"], job)
        assert {k: flow[k] for k in columns} == {k: cli[v] for k, v in columns.items()}, job
    [first] = await conn.fetch("SELECT * FROM chunkd.job_flow($1)", jobs[0])
    assert first["tokens"] == 2.0 and first["kind_tokens"] == 7.0 and first["key_processing"] == 0
    assert await conn.fetch("SELECT * FROM chunkd.job_flow($1)", uuid.uuid4()) == []


async def test_upgrading_keeps_the_dashboard_role_working(empty_database) -> None:
    """A read-only dashboard role of version 6 may read what the pages read in version 7."""
    web_flow = next(m.version for m in migrations() if m.name == "web_flow")
    role = f"chunkd_webup_{uuid.uuid4().hex[:8]}"
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=web_flow - 1)
        await conn.execute(f"CREATE ROLE {role}")
        await conn.execute(
            "GRANT EXECUTE ON FUNCTION chunkd.sync_jobs_page(text, text, int, int),"
            f" chunkd.queue_depth_by_kind() TO {role}"
        )
        assert (await apply_migrations(conn, up_to=web_flow)).versions == [web_flow]
        privileges = await conn.fetchrow(
            "SELECT has_function_privilege($1, 'chunkd.job_flow(uuid)', 'EXECUTE') AS flow,"
            " has_function_privilege($1, 'chunkd.queue_depth_by_kind()', 'EXECUTE') AS depth,"
            " has_table_privilege($1, 'chunkd.job_events', 'SELECT') AS events,"
            " has_function_privilege($1, 'chunkd.pause_sync_job(uuid)', 'EXECUTE') AS pause,"
            " has_function_privilege('public', 'chunkd.job_flow(uuid)', 'EXECUTE') AS public",
            role,
        )
        assert dict(privileges) == {
            "flow": True, "depth": True, "events": True, "pause": False, "public": False
        }  # fmt: skip
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()


async def test_pause_and_resume_need_a_confirmation_and_a_csrf_token(conn, database) -> None:
    job = await create_job(conn, 3)

    async def paused() -> bool:
        query = "SELECT paused_at IS NOT NULL FROM chunkd.sync_jobs WHERE id = $1"
        return bool(await _sql(conn, query, job))

    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        confirm = await http.get(f"/jobs/{job}/pause")
        assert confirm.status_code == 200 and "None of its 3 pending chunk(s)" in confirm.text
        assert not await paused(), "showing the confirmation changes nothing"
        csrf = csrf_of(confirm.text)
        assert (await http.post(f"/jobs/{job}/pause", data={})).status_code == 403
        cross_site = await http.post(
            f"/jobs/{job}/pause", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert cross_site.status_code == 403 and not await paused()

        done = await http.post(f"/jobs/{job}/pause", data={"csrf": csrf})
        assert done.status_code == 303
        assert done.headers["location"] == f"/jobs/{job}?done=pause&n=3"
        assert await paused()
        assert await claim(conn, "w1", 3) == [], "nothing of a paused job is claimed"
        shown = (await http.get(done.headers["location"])).text
        assert "job paused: 3 pending chunk(s) held back" in shown
        assert '<span class="badge st-paused">paused</span>' in shown
        again = await http.get(f"/jobs/{job}/pause")
        assert "This does not apply to the job as it is now" in again.text

        resume = await http.get(f"/jobs/{job}/resume")
        assert "Its 3 pending chunk(s) may be claimed again" in resume.text
        assert (await http.post(f"/jobs/{job}/resume", data={})).status_code == 403
        assert await paused()
        done = await http.post(f"/jobs/{job}/resume", data={"csrf": csrf_of(resume.text)})
        assert done.headers["location"] == f"/jobs/{job}?done=resume&n=3"
        assert not await paused()
        shown = (await http.get(done.headers["location"])).text
        assert "job resumed: 3 pending chunk(s)" in shown
        events = re.findall(r'<tr data-event="(\w+)">', shown)
        assert events == ["resumed", "paused"], "newest first"
        assert len(await claim(conn, "w1", 3)) == 3
