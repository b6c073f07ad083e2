"""The dashboard under test: ``chunkd web`` served in this process (for the API and page
tests) or as a real subprocess (the CLI and browser tests), and Debian's Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chunkd.db import create_pool
from chunkd.web import WebSettings, create_app

TESTS_DIR = Path(__file__).resolve().parent
ARTIFACTS = TESTS_DIR / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium in a container: no sandbox (we are root), no GPU, and nothing that
# reaches the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "test-operator-token-8c2f41d9"
CSRF_FIELD = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def chromium() -> Path:
    """The system browser; without it the browser tests fail under CI and skip elsewhere."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        message = "no Chromium at /usr/bin/chromium (apt-get install chromium; tests/run.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return CHROMIUM


@contextlib.asynccontextmanager
async def serve(dsn: str, **options: Any) -> AsyncIterator[str]:
    """The app in this process, on a free loopback port, with a real uvicorn and pool; yields
    its base URL."""
    import uvicorn

    settings = WebSettings(dsn=dsn, port=0, **{"refresh_s": 0.2, **options})
    pool = await create_pool(dsn, size=4)
    app = create_app(settings, pool)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        app.state.stopping.set()
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        await pool.close()
        sock.close()


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, "the page has no CSRF field"
    return found[1]


class WebProcess:
    """``chunkd web`` as a subprocess, its JSON log in a file; ``url`` once it listens."""

    def __init__(self, dsn: str, log_path: Path, *args: str, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
        full_env.update(CHUNKD_DSN=dsn, **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chunkd.cli", "--log-format", "json", "web", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self.url = ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def listening(self, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "web.listening":
                        self.url = str(event["url"]).rstrip("/")
                        return self.url
            if self.process.poll() is not None:
                raise AssertionError(f"chunkd web exited early:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"chunkd web not listening after {timeout_s}s:\n{self.log_text()}")

    def local_url(self) -> str:
        """The URL on 127.0.0.1 (a server bound to 0.0.0.0 reports that address)."""
        return re.sub(r"^http://[^/]+:", "http://127.0.0.1:", self.url)

    async def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"chunkd web ignored SIGTERM:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()
