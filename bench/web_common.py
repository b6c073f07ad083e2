"""Shared by bench/web_pages.py and bench/web_screenshots.py: ``chunkd web`` as a subprocess
and Debian's headless Chromium driven by Playwright (the system browser, never a downloaded
one)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from playwright.async_api import Browser, async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chunkd(
    *args: str, dsn: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``chunkd ARGS`` from this interpreter, JSON logs to ``log``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    full_env.update(CHUNKD_DSN=dsn, **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "chunkd.cli", "--log-format", "json", *args],
        stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env,
    )  # fmt: skip


@contextlib.contextmanager
def web_server(dsn: str, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``chunkd web --port 0 ARGS``; yields its base URL once it listens; stopped after."""
    process = chunkd("web", "--port", "0", *args, dsn=dsn, log=log, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            for line in log.read_text(errors="replace").splitlines():
                if '"web.listening"' in line:
                    yield str(json.loads(line)["url"]).rstrip("/")
                    return
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chunkd web did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(20)


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no browser at {CHROMIUM}: apt-get install chromium")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
