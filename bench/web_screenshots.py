"""Regenerates the dashboard screenshots of docs/web.md (docs/img/web-*.png).

Everything is real: a throwaway PostgreSQL cluster, ``chunkd run`` with the demo's simulated
mailbox handler (chunkd.demo.handler) on three labeled mailbox syncs (one of them sharing the
concurrency key of its customer), a fourth one paused, a fifth one due in two hours, under a
rate limit of the kind, and an export nobody handles, ``chunkd web``, and Debian's headless
Chromium driven by Playwright. Takes about a minute:

    .venv/bin/python bench/web_screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from web_common import chromium, chunkd, require_chromium, web_server

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import throwaway_cluster
from chunkd.demo.handler import KIND, mailbox_chunks, mailbox_payload

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "screenshot-token-0123456789"


async def enqueue(dsn: str) -> dict[str, Any]:
    conn = await connect(dsn)
    try:
        await apply_migrations(conn)
        await conn.execute("SELECT chunkd.set_rate_limit($1, 200)", KIND)
        await conn.execute("SELECT chunkd.set_concurrency_limit('acme', 8)")
        jobs = {}
        for name, pages, broken, key, delay_s, label in (
            ("bob", 150, 42, None, None, "Initial import · bob@example.com"),
            ("carol", 60, None, None, None, "Daily sync · carol@example.com"),
            ("dave", 300, None, None, None, "Initial import · dave@example.com"),
            ("erin", 400, None, None, 7200, "Nightly sync · erin@example.com"),
            ("alice", 1500, 7, "acme", None, "Acme · alice@example.com"),
        ):
            mailbox = f"{name}@example.com"
            jobs[name] = await conn.fetchval(
                "SELECT * FROM chunkd.create_sync_jobs(jsonb_build_array(jsonb_build_object("
                "'kind', $1::text, 'chunks', $2::jsonb, 'payload', $3::jsonb,"
                " 'concurrency_key', $4::text, 'run_at', now() + make_interval(secs => $5),"
                " 'label', $6::text)))",
                KIND,
                json.dumps(mailbox_chunks(mailbox, pages)),
                json.dumps(mailbox_payload(mailbox, pages, broken)),
                key,
                delay_s or 0,
                label,
            )
        jobs["export"] = await conn.fetchval(
            "SELECT chunkd.create_sync_job('report-export', $1::jsonb)",
            json.dumps([{"part": i} for i in range(40)]),
        )
        return jobs
    finally:
        await conn.close()


async def progress(dsn: str, job: Any) -> dict[str, Any]:
    conn = await connect(dsn)
    try:
        result: dict[str, Any] = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        return result
    finally:
        await conn.close()


async def shoot(url: str, guarded_url: str, jobs: dict[str, Any], dsn: str, out: Path) -> None:
    deadline = time.monotonic() + 120
    while (await progress(dsn, jobs["dave"]))["progress_percentage"] < 20:
        if time.monotonic() > deadline:
            raise RuntimeError("the sample jobs did not get far enough")
        await asyncio.sleep(0.2)
    conn = await connect(dsn)
    try:
        await conn.execute("SELECT chunkd.pause_sync_job($1)", jobs["dave"])
    finally:
        await conn.close()
    while (await progress(dsn, jobs["bob"]))["overall_status"] != "partial_failure" or (
        await progress(dsn, jobs["alice"])
    )["progress_percentage"] < 30:
        if time.monotonic() > deadline:
            raise RuntimeError("the sample jobs did not get far enough")
        await asyncio.sleep(0.5)
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 800})

        async def save(name: str, path: str, *, settle_s: float = 1.0, full: bool = False) -> None:
            await page.goto(url + path)
            await asyncio.sleep(settle_s)
            await page.screenshot(path=str(out / f"web-{name}.png"), full_page=full)
            print(f"wrote {out / f'web-{name}.png'}")

        await save("jobs", "/jobs")
        await save("search", "/jobs?q=initial", settle_s=0.3)
        await save("kind", f"/jobs?kind={KIND}", settle_s=0.3)
        await page.set_viewport_size({"width": 1280, "height": 1100})
        await save("job", f"/jobs/{jobs['alice']}", settle_s=1.5)
        await page.set_viewport_size({"width": 1280, "height": 800})
        await page.goto(f"{url}/jobs/{jobs['bob']}")
        await asyncio.sleep(0.5)
        await page.click("#chunk-map", position={"x": 42 % 80 * 16 + 4, "y": 42 // 80 * 16 + 4})
        await page.wait_for_selector("#chunk-detail .chunk")
        await page.locator("#chunk-detail").scroll_into_view_if_needed()
        await page.screenshot(path=str(out / "web-chunk.png"))
        print(f"wrote {out / 'web-chunk.png'}")
        await save("confirm", f"/jobs/{jobs['bob']}/retry", settle_s=0.3)
        await save("paused", f"/jobs/{jobs['dave']}", settle_s=1.0)
        await save("workers", "/workers", settle_s=0.3)
        await save("queue", "/queue", settle_s=0.3)
        await page.goto(guarded_url + "/jobs")
        await page.screenshot(path=str(out / "web-login.png"))
        print(f"wrote {out / 'web-login.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    require_chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    with throwaway_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        dsn = cluster.dsn("postgres")
        jobs = asyncio.run(enqueue(dsn))
        daemons = [
            chunkd(
                "run",
                "--handler",
                f"{KIND}=chunkd.demo.handler:fetch_messages_page",
                "--concurrency",
                "6",
                dsn=dsn,
                log=Path(tmp) / f"run{i}.log",
            )
            for i in range(2)
        ]
        try:
            with (
                web_server(dsn, Path(tmp) / "web.log", "--refresh", "1s") as url,
                web_server(
                    dsn, Path(tmp) / "web2.log", env={"CHUNKD_WEB_TOKEN": TOKEN}
                ) as guarded_url,
            ):
                asyncio.run(shoot(url, guarded_url, jobs, dsn, args.out))
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(30)


if __name__ == "__main__":
    main()
