"""The progress API of ``chunkd web`` and its security, over real HTTP on a real PostgreSQL:
the JSON keys are get_sync_job_progress's, the event stream follows a job to its end, the
operator token, CSRF and the Host check refuse what they must, and no secret reaches a page."""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

import httpx

from sql_helpers import claim, complete, create_job, fail
from web_helpers import TOKEN, csrf_of, serve


async def test_progress_is_get_sync_job_progress_exactly(conn, database) -> None:
    job = await create_job(conn, 4, kind="mail-sync")
    [row] = await claim(conn, "w1")
    await complete(conn, row["queue_id"], "w1", row["attempt"])
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get(f"/api/jobs/{job}")
        expected = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body.keys() == expected.keys()
        volatile = {"chunks_per_second", "eta_seconds"}  # they move with the clock
        assert {k: v for k, v in body.items() if k not in volatile} == {
            k: v for k, v in expected.items() if k not in volatile
        }
        assert body["completed_chunks"] == 1 and body["total_chunks"] == 4

        missing = await http.get(f"/api/jobs/{uuid4()}")
        assert missing.status_code == 404 and "no sync job" in missing.json()["error"]
        malformed = await http.get("/api/jobs/not-a-uuid")
        assert malformed.status_code == 404 and "error" in malformed.json()


async def _events(response: httpx.Response) -> Any:
    """Parses a text/event-stream into (event, data) pairs as they arrive."""
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def test_event_stream_pushes_progress_until_the_job_finishes(conn, database) -> None:
    job = await create_job(conn, 3)
    seen: list[tuple[str, Any]] = []
    moved = 0
    async with serve(database.dsn, refresh_s=0.1) as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("GET", f"/api/jobs/{job}/events", timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for name, body in _events(response):
                seen.append((name, body))
                if name == "progress" and body["completed_chunks"] == moved and moved < 3:
                    # The stream has shown every move so far: move the job one chunk on.
                    [row] = await claim(conn, "w1")
                    await complete(conn, row["queue_id"], "w1", row["attempt"])
                    moved += 1
            # The loop ended because the server closed the stream after "end".
    progress = [b for n, b in seen if n == "progress"]
    assert progress[0]["completed_chunks"] == 0
    assert progress[-1]["completed_chunks"] == 3 and progress[-1]["overall_status"] == "completed"
    completed = [p["completed_chunks"] for p in progress]
    assert completed == sorted(completed) and set(completed) == {0, 1, 2, 3}
    assert seen[-1] == ("end", {"overall_status": "completed"})


async def test_event_stream_of_an_unknown_job_is_404(database) -> None:
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get(f"/api/jobs/{uuid4()}/events")
        assert response.status_code == 404


async def test_with_a_token_every_request_needs_it(conn, database) -> None:
    job = await create_job(conn, 2)
    async with serve(database.dsn, token=TOKEN) as url:
        async with httpx.AsyncClient(base_url=url) as anonymous:
            for path in ("/jobs", f"/jobs/{job}", "/workers", "/queue", f"/jobs/{job}/payload"):
                refused = await anonymous.get(path)
                assert refused.status_code == 401, path
                assert 'name="token"' in refused.text, "pages answer with the login form"
                assert "<table" not in refused.text and "<canvas" not in refused.text
            api = await anonymous.get(f"/api/jobs/{job}")
            assert api.status_code == 401 and api.json() == {
                "error": "the operator token is required"
            }
            assert api.headers["www-authenticate"].startswith("Bearer")
            wrong = await anonymous.get(
                f"/api/jobs/{job}", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}
            )
            assert wrong.status_code == 401
            stream = await anonymous.get(f"/api/jobs/{job}/events")
            assert stream.status_code == 401
            forged = await anonymous.get("/jobs", headers={"Cookie": "chunkd_session=1.abc"})
            assert forged.status_code == 401
            # The stylesheet and script are the same for everyone (the login form needs them).
            assert (await anonymous.get("/static/style.css")).status_code == 200

        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as app_client:
            ok = await app_client.get(f"/api/jobs/{job}")
            assert ok.status_code == 200 and ok.json()["total_chunks"] == 2

        async with httpx.AsyncClient(base_url=url) as browser:
            form = await browser.get("/login")
            assert form.status_code == 200
            csrf = csrf_of(form.text)
            bad = await browser.post(
                "/login", data={"token": "not-the-token-at-all", "csrf": csrf, "next": "/queue"}
            )
            assert bad.status_code == 401 and "wrong token" in bad.text
            no_csrf = await browser.post("/login", data={"token": TOKEN, "next": "/queue"})
            assert no_csrf.status_code == 403
            good = await browser.post(
                "/login", data={"token": TOKEN, "csrf": csrf, "next": "//evil.example/x"}
            )
            assert good.status_code == 303 and good.headers["location"] == "/jobs"
            cookie = good.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
            assert (await browser.get(f"/jobs/{job}")).status_code == 200
            assert (await browser.get(f"/api/jobs/{job}")).status_code == 200
            page = await browser.get("/jobs")
            out = await browser.post("/logout", data={"csrf": csrf_of(page.text)})
            assert out.status_code == 303
            assert (await browser.get("/jobs")).status_code == 401


async def test_without_a_token_only_loopback_host_names_are_answered(database) -> None:
    """A page on evil.example that rebinds its DNS name to 127.0.0.1 must not read the
    dashboard: its requests carry Host: evil.example."""
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/jobs")).status_code == 200
        assert (await http.get("/jobs", headers={"Host": "localhost"})).status_code == 200
        rebound = await http.get("/api/jobs/" + str(uuid4()), headers={"Host": "evil.example"})
        assert rebound.status_code == 400
        page = await http.get("/jobs", headers={"Host": "evil.example:8080"})
        assert page.status_code == 400 and "<table" not in page.text


async def test_actions_need_a_confirmation_and_a_csrf_token(conn, database) -> None:
    job = await create_job(conn, 2, max_attempts=1)
    for row in await claim(conn, "w1", 2):
        await fail(conn, row["queue_id"], "w1", row["attempt"], "boom", retryable=False)
    failed = {"failed": 2}

    async def counts() -> dict[str, int]:
        rows = await conn.fetch(
            "SELECT status, count(*)::int AS n FROM chunkd.chunk_processing_queue"
            " WHERE parent_sync_job_id = $1 GROUP BY status",
            job,
        )
        return {r["status"]: r["n"] for r in rows}

    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        confirm = await http.get(f"/jobs/{job}/retry")
        assert confirm.status_code == 200 and "2 failed chunk(s)" in confirm.text
        assert await counts() == failed, "showing the confirmation changes nothing"
        csrf = csrf_of(confirm.text)

        no_token = await http.post(f"/jobs/{job}/retry", data={})
        assert no_token.status_code == 403
        wrong = await http.post(f"/jobs/{job}/retry", data={"csrf": "0" * 64})
        assert wrong.status_code == 403
        cross_site = await http.post(
            f"/jobs/{job}/retry", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert cross_site.status_code == 403
        async with httpx.AsyncClient(base_url=url) as other_browser:
            stolen = await other_browser.post(f"/jobs/{job}/retry", data={"csrf": csrf})
        assert stolen.status_code == 403, "a token is only good with its own cookie"
        assert await counts() == failed

        done = await http.post(f"/jobs/{job}/retry", data={"csrf": csrf}, headers={"Origin": url})
        assert done.status_code == 303
        assert done.headers["location"] == f"/jobs/{job}?done=retry&n=2"
        assert await counts() == {"pending": 2}
        shown = await http.get(done.headers["location"])
        assert "2 failed chunk(s) back to pending" in shown.text

        cancel = await http.get(f"/jobs/{job}/cancel")
        assert "2 pending and 0 processing chunk(s)" in cancel.text
        cancelled = await http.post(f"/jobs/{job}/cancel", data={"csrf": csrf_of(cancel.text)})
        assert cancelled.status_code == 303
        status = await conn.fetchrow(
            "SELECT overall_status, cancelled_chunks FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        )
        assert tuple(status) == ("cancelled", 2)
        again = await http.post(f"/jobs/{job}/retry", data={"csrf": csrf})
        assert again.status_code == 503, "the server's refusal is shown as one line"
        assert "is cancelled; its chunks cannot be retried" in again.text
        assert "Traceback" not in again.text
        assert (await http.post(f"/jobs/{job}/purge", data={"csrf": csrf})).status_code == 404


async def test_pages_carry_the_security_headers(database) -> None:
    async with serve(database.dsn) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/jobs")
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert "chunkd_csrf=" in response.headers["set-cookie"]


async def test_no_secret_reaches_a_page(conn, database) -> None:
    """The DSN's password never appears; payloads show only on request, masked, truncated."""
    password = "Dsn-Pw-91a7c3"
    secret = "payload-secret-55d0e2"
    dsn = database.dsn.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    job = await create_job(
        conn,
        [{"page": 1, "api_key": secret, "note": "x" * 5000}],
        payload={
            "mailbox": "inbox",
            "password": secret,
            "nested": {"auth": {"user": "u", "token": secret}},
            "source": f"imaps://user:{secret}@mail.example/INBOX",
            "header": f"Bearer {secret}",
        },
    )
    [row] = await claim(conn, "w1")
    await fail(conn, row["queue_id"], "w1", row["attempt"], "boom", retryable=False)
    async with serve(dsn) as url, httpx.AsyncClient(base_url=url) as http:
        bodies = []
        for path in (
            "/jobs", "/jobs?part=rows", f"/jobs/{job}", f"/jobs/{job}?part=summary",
            f"/jobs/{job}?part=history", f"/jobs/{job}/chunks/0", f"/jobs/{job}/retry",
            "/workers", "/queue", f"/api/jobs/{job}", f"/api/jobs/{job}/chunks",
        ):  # fmt: skip
            response = await http.get(path)
            assert response.status_code == 200, path
            bodies.append(response.text)
        everything = "\n".join(bodies)
        assert password not in everything and secret not in everything
        assert "inbox" not in everything, "payloads are not on the pages until asked for"

        job_payload = (await http.get(f"/jobs/{job}/payload")).text
        assert "inbox" in job_payload and "mail.example" in job_payload
        assert secret not in job_payload and "***" in job_payload
        chunk_payload = (await http.get(f"/jobs/{job}/chunks/0/payload")).text
        assert secret not in chunk_payload and "cut at 2000 characters" in chunk_payload
        assert len(chunk_payload) < 3000
