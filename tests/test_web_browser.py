"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, a real
``chunkd run`` working on two jobs and a real ``chunkd web``, all on a real PostgreSQL.

It watches a running job's progress advance on the jobs page without a reload, pauses and
resumes that job through the confirmation pages of a second tab and sees its status badge
change on the first without a reload, reads the flow controls of a rate-limited job and what
a delayed and an open job say, finds jobs by the start of a label and of an id in the search
box, pauses and resumes a kind from its page with clicks, finds one chunk-map cell per chunk
on the running job's detail
page (read back from the canvas' pixels), retries a failed job through the confirmation page
and sees its chunks run again, and is refused without the token by a server bound beyond
localhost. Screenshots of each page go to
``tests/artifacts/`` (kept by CI, ignored by git).
"""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from daemon_handlers import EXECUTIONS_DDL
from daemon_helpers import wait_until
from sql_helpers import create_job
from web_helpers import ARTIFACTS, CHROMIUM_ARGS, TOKEN, chromium

pytestmark = pytest.mark.timeout(300)

# Reads the colour at the centre of every cell of the chunk map (and one past the last) and
# names it by the nearest state colour of the stylesheet; "none" for the empty background.
READ_CELLS = """
(canvas) => {
  const n = Number(canvas.dataset.cells), cell = Number(canvas.dataset.cellSize);
  const columns = Number(canvas.dataset.columns), ratio = canvas.width / (columns * cell);
  const style = getComputedStyle(document.documentElement);
  const names = {pending: "--pending", waiting: "--waiting", processing: "--processing",
                 completed: "--completed", failed: "--failed", cancelled: "--cancelled"};
  const hex = (v) => [1, 3, 5].map((i) => parseInt(v.trim().slice(i, i + 2), 16));
  const palette = Object.entries(names).map(([k, v]) => [k, hex(style.getPropertyValue(v))]);
  const context = canvas.getContext("2d");
  const seen = [];
  for (let seq = 0; seq <= n; seq++) {
    const x = ((seq % columns) * cell + cell / 2 - 0.5) * ratio;
    const y = (Math.floor(seq / columns) * cell + cell / 2 - 0.5) * ratio;
    const [r, g, b, a] = context.getImageData(Math.floor(x), Math.floor(y), 1, 1).data;
    if (a === 0) { seen.push("none"); continue; }
    let best = "none", distance = 1e9;
    for (const [name, [pr, pg, pb]] of palette) {
      const d = (r - pr) ** 2 + (g - pg) ** 2 + (b - pb) ** 2;
      if (d < distance) { best = name; distance = d; }
    }
    seen.push(distance < 300 ? best : "unknown");
  }
  return seen;
}
"""


async def _until(page: Page, script: str, arg: Any = None, *, timeout_s: float, what: str) -> None:
    """Polls ``script`` in the page until it is truthy. (Playwright's wait_for_function
    evaluates strings, which the dashboard's Content-Security-Policy rightly forbids.)"""

    async def check() -> bool:
        return bool(await page.evaluate(script, arg))

    await wait_until(check, timeout_s=timeout_s, what=what, interval_s=0.1)


CELLS_DRAWN = "(n) => document.querySelector('#chunk-map').dataset.cells === String(n)"


async def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


async def _progress(conn: Any, job: Any) -> dict[str, Any]:
    result: dict[str, Any] = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
    return result


async def test_the_dashboard_in_a_real_browser(conn, database, start, start_web) -> None:
    executable = chromium()
    await conn.execute(EXECUTIONS_DDL)
    running = await create_job(
        conn, [{"sleep_s": 0.35} for _ in range(48)], kind="test", max_concurrency=2
    )
    flaky = await create_job(conn, [{"fail": "first_run"} for _ in range(6)], kind="test")
    # Jobs no daemon here runs: under flow control, delayed, open.
    await conn.execute("SELECT chunkd.set_rate_limit('gmail-sync', 350, burst => 100)")
    limited = await conn.fetchval(
        "SELECT * FROM chunkd.create_sync_jobs($1::jsonb)",
        '[{"kind": "gmail-sync", "chunks": [1, 2], "max_per_second": 4,'
        ' "concurrency_key": "customer-17", "label": "Customer 17 mailbox"}]',
    )
    delayed = await conn.fetchval(
        "SELECT chunkd.create_sync_job('report', '[1]', run_at => now() + interval '2 hours')"
    )
    opened = await conn.fetchval("SELECT chunkd.create_sync_job('import', '[]', open => true)")
    start("--handler", "test=daemon_handlers:record", "--concurrency", "4")
    web = start_web("--port", "0", "--refresh", "300ms")
    url = await web.listening()
    await wait_until(
        lambda: _progress(conn, flaky),
        timeout_s=30,
        what="the daemon to start",
    )

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(executable), args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Jobs: the running job's progress advances while the page stays loaded.
            assert (await page.goto(f"{url}/jobs")).status == 200  # type: ignore[union-attr]
            await page.evaluate("window.__sameDocument = true")
            row = page.locator(f'tr[data-job="{running}"]')
            before = float(await row.get_attribute("data-progress") or 0)
            assert before < 100
            await _until(
                page,
                "([job, before]) => Number(document.querySelector(`tr[data-job='${job}']`)"
                ".dataset.progress) > before",
                [str(running), before],
                timeout_s=20,
                what="the progress to advance on the jobs page",
            )
            assert await page.evaluate("window.__sameDocument === true"), "no reload happened"
            assert await row.locator(".bar rect").count() >= 1
            await _shot(page, "jobs")

            # Pause the running job from a second tab: a confirmation, then a POST with the
            # CSRF token; the first tab's badge turns to "paused" without a reload, and back.
            tab = await context.new_page()
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            for action, badge in (("pause", "paused"), ("resume", "processing")):
                await tab.goto(f"{url}/jobs/{running}")
                await tab.click(f'a[data-action="{action}"]')
                await tab.wait_for_url(f"{url}/jobs/{running}/{action}")
                assert "pending chunk(s)" in await tab.inner_text(".question")
                assert await tab.locator('form.confirm input[name="csrf"]').count() == 1
                await tab.click("#confirm")
                await tab.wait_for_url(f"{url}/jobs/{running}?done={action}&n=*")
                assert f"job {action}d" in await tab.inner_text(".notice")
                assert await tab.inner_text("#summary .badge") == badge
                await _until(
                    page,
                    "([job, badge]) => document.querySelector(`tr[data-job='${job}'] .badge`)"
                    ".textContent === badge",
                    [str(running), badge],
                    timeout_s=10,
                    what=f"the jobs page to show the job {badge}",
                )
                assert await page.evaluate("window.__sameDocument === true"), "no reload"
                if action == "pause":
                    assert await tab.locator('#summary [data-note="paused"]').count() == 1
                    assert await tab.locator('a[data-action="resume"]').count() == 1
                    await _shot(tab, "paused")
            between = await conn.fetchval(
                "SELECT count(*) FROM chunkd.chunk_events c WHERE c.sync_job_id = $1"
                " AND c.event = 'claimed' AND c.at BETWEEN"
                " (SELECT at FROM chunkd.job_events WHERE sync_job_id = $1 AND event = 'paused')"
                " AND (SELECT at FROM chunkd.job_events"
                "      WHERE sync_job_id = $1 AND event = 'resumed')",
                running,
            )
            assert between == 0, "no chunk of the job was claimed while it was paused"

            # What a rate-limited, a delayed and an open job say.
            await tab.goto(f"{url}/jobs/{limited}")
            flow = await tab.inner_text("#summary .flow")
            assert "job rate 4/s (burst 2;" in flow and "kind gmail-sync rate 350/s" in flow
            assert "concurrency key customer-17: no limit set" in flow
            await tab.goto(f"{url}/jobs/{delayed}")
            assert await tab.inner_text("#summary .badge") == "scheduled"
            assert "Starts at" in await tab.inner_text('#summary [data-note="scheduled"]')
            await tab.goto(f"{url}/jobs/{opened}")
            assert "Open:" in await tab.inner_text('#summary [data-note="open"]')

            # The search box: the start of a label, then of a job id.
            for query, wanted in ((str(delayed)[:8], delayed), ("customer 17", limited)):
                await tab.goto(f"{url}/jobs")
                await tab.fill('input[name="q"]', query)
                await tab.press('input[name="q"]', "Enter")
                await tab.wait_for_url(f"{url}/jobs?q=*")
                shown = [await r.get_attribute("data-job") for r in await _rows(tab)]
                assert shown == [str(wanted)], (query, shown)
            label = await tab.inner_text(f'tr[data-job="{limited}"] [data-label]')
            assert label == "Customer 17 mailbox"
            await _shot(tab, "search")

            # Pause the job's kind from the kind's page, then resume it, with clicks.
            await tab.click(f'tr[data-job="{limited}"] a.kind')
            await tab.wait_for_url(f"{url}/jobs?kind=gmail-sync")
            for action, badge in (("pause", "paused"), ("resume", "pending")):
                await tab.click(f'a[data-action="kind-{action}"]')
                await tab.wait_for_url(f"{url}/kinds/{action}?kind=gmail-sync")
                assert "gmail-sync" in await tab.inner_text(".question")
                await tab.click("#confirm")
                await tab.wait_for_url(f"{url}/jobs?kind=gmail-sync&done={action}&n=2")
                assert f"kind {action}d: 2 pending chunk(s)" in await tab.inner_text(".notice")
                assert await tab.inner_text(f'tr[data-job="{limited}"] .badge') == badge
                paused_at = await conn.fetchval(
                    "SELECT paused_at FROM chunkd.kind_flow WHERE kind = 'gmail-sync'"
                )
                assert (paused_at is not None) == (action == "pause")
                if action == "pause":
                    assert await tab.locator('[data-note="kind-paused"]').count() == 1
                    await _shot(tab, "kind-paused")
            await tab.close()

            # Job detail: one chunk-map cell per chunk, coloured by state.
            await page.click(f'a[href="/jobs/{running}"]')
            await page.wait_for_url(f"{url}/jobs/{running}")
            canvas = page.locator("#chunk-map")
            await _until(page, CELLS_DRAWN, 48, timeout_s=10, what="the chunk map")
            cells = await canvas.evaluate(READ_CELLS)
            assert len(cells) == 49 and cells[48] == "none", "nothing drawn past the last chunk"
            assert all(c in ("pending", "processing", "completed") for c in cells[:48]), cells
            await wait_until(
                lambda: _finished(conn, running), timeout_s=60, what="the running job to finish"
            )
            await page.wait_for_selector(
                '#summary .summary[data-status="completed"]', timeout=15_000
            )
            await page.reload()
            await _until(page, CELLS_DRAWN, 48, timeout_s=10, what="the chunk map")
            assert await canvas.evaluate(READ_CELLS) == ["completed"] * 48 + ["none"]
            await canvas.click(position={"x": 2, "y": 2})  # the first cell: chunk #0
            await page.wait_for_selector('#chunk-detail .chunk[data-seq="0"]')
            assert "claimed" in await page.inner_text("#chunk-detail")
            await _shot(page, "job")

            # Retry the failed job through the UI; its chunks run again, and succeed.
            await wait_until(
                lambda: _status_is(conn, flaky, "partial_failure"),
                timeout_s=30,
                what="the flaky job to fail",
            )
            await page.goto(f"{url}/jobs/{flaky}")
            await page.click('a[data-action="retry"]')
            await page.wait_for_url(f"{url}/jobs/{flaky}/retry")
            assert "6 failed chunk(s)" in await page.inner_text("main")
            await _shot(page, "confirm")
            await page.click("#confirm")
            await page.wait_for_url(f"{url}/jobs/{flaky}?done=retry&n=6")
            assert "6 failed chunk(s) back to pending" in await page.inner_text(".notice")
            await page.wait_for_selector(
                '#summary .summary[data-status="completed"]', timeout=30_000
            )
            runs = await conn.fetch(
                "SELECT seq, count(*) AS n FROM public.test_executions WHERE job_id = $1"
                " GROUP BY seq",
                flaky,
            )
            assert sorted((r["seq"], r["n"]) for r in runs) == [(s, 2) for s in range(6)]
            assert (await _progress(conn, flaky))["completed_chunks"] == 6

            # Workers and queue.
            await page.goto(f"{url}/workers")
            assert await page.locator('tr[data-live="1"]').count() == 1
            await _shot(page, "workers")
            await page.goto(f"{url}/queue")
            # The daemon's kind is drained; what is left waits for its rate or its start.
            depth = {
                kind: await page.inner_text(f'tr[data-kind="{kind}"]')
                for kind in ("gmail-sync", "report")
            }
            assert depth == {"gmail-sync": "gmail-sync\t0\t0\t2\t0\t0",
                             "report": "report\t0\t0\t0\t1\t0"}  # fmt: skip
            assert await page.locator('tr[data-kind="test"]').count() == 0
            await _shot(page, "queue")
            assert errors == [], errors

            # Bound beyond localhost, the dashboard refuses a request without the token.
            guarded = start_web("--host", "0.0.0.0", "--port", "0", env={"CHUNKD_WEB_TOKEN": TOKEN})
            await guarded.listening()
            other = guarded.local_url()
            stranger = await browser.new_page()
            response = await stranger.goto(f"{other}/jobs/{flaky}")
            assert response is not None and response.status == 401
            assert await stranger.locator('input[name="token"]').count() == 1
            assert str(flaky)[:8] not in await stranger.inner_text("main")
            api = await stranger.request.get(f"{other}/api/jobs/{flaky}")
            assert api.status == 401
            await _shot(stranger, "login")
            await stranger.fill('input[name="token"]', TOKEN)
            await stranger.click('button[type="submit"]')
            await stranger.wait_for_url(f"{other}/jobs/{flaky}")
            assert await stranger.locator("#chunk-map").count() == 1
            assert (await stranger.request.get(f"{other}/api/jobs/{flaky}")).status == 200
        finally:
            await browser.close()


async def _rows(page: Page) -> list[Any]:
    return list(await page.locator("tr[data-job]").all())


async def _finished(conn: Any, job: Any) -> bool:
    return (await _progress(conn, job))["overall_status"] == "completed"


async def _status_is(conn: Any, job: Any, status: str) -> bool:
    return (await _progress(conn, job))["overall_status"] == status
