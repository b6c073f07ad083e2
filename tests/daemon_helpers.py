"""Real ``chunkd run`` subprocesses for the daemon tests, and bounded waits on the database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class CliRun:
    """One finished ``chunkd`` command: exit code, stdout, stderr."""

    code: int
    stdout: str
    stderr: str

    def one_error_line(self) -> str:
        """The single ``chunkd: error: ...`` line on stderr (and no traceback), without prefix."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("chunkd: error: "), self.stderr
        return lines[0].removeprefix("chunkd: error: ")


def run_chunkd(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> CliRun:
    """``chunkd ARGS`` as a real subprocess, without the caller's DSN variables, handlers on
    PYTHONPATH (blocking: call it through asyncio.to_thread from async tests)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
    )
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "chunkd.cli", *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        timeout=60,
    )
    return CliRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode(errors="replace"))


# The lines of a chunk's outcome that carry its handler's exception at --log-level debug.
OUTCOME_EVENTS = frozenset(
    {"chunk.retry_scheduled", "chunk.failed", "chunk.snoozed", "chunk.fenced",
     "chunk.outcome_unstorable"}
)  # fmt: skip


class Daemon:
    """One ``chunkd run`` process with its JSON log captured to a file (never a pipe: a full
    pipe would block the daemon's logging and stall it)."""

    def __init__(
        self,
        dsn: str,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        log_level: str = "debug",
        log_format: str = "json",
    ):
        # Debug by default: tests follow chunks through their success lines (chunk.completed),
        # which production logs only at debug (chunkd.runtime.progress).
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(
            CHUNKD_DSN=dsn,
            # No maintenance unless a test asks for it (--maintenance-interval, or env): the
            # tests read a finished job's claims and chunks from the live tables, which the
            # maintenance empties within its 10 s (tests/test_daemon_maintenance.py runs it).
            CHUNKD_MAINTENANCE_INTERVAL="0",
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
            ),
        )
        full_env.update(env or {})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chunkd.cli",
                "--log-format",
                log_format,
                "--log-level",
                log_level,
                "run",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"chunkd run (pid {self.pid}) still running after {timeout_s}s")
            await asyncio.sleep(0.02)
        self._log.close()
        return self.process.returncode

    async def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every log line parsed as JSON: a line that is not JSON fails the test here."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def crash_lines(self) -> list[dict[str, Any]]:
        """Log lines with a traceback that is not a handler's: at ``--log-level debug`` an
        outcome line (``chunk.retry_scheduled``, ``chunk.failed``, ...) carries its handler's
        exception, any other traceback is a crash of chunkd's. Every line must be JSON (a
        traceback printed bare fails :meth:`events`)."""
        return [e for e in self.events() if "exception" in e and e["event"] not in OUTCOME_EVENTS]

    async def wait_for_event(self, event: str, timeout_s: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == event:
                    return e
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited before {event!r}:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {event!r} within {timeout_s}s:\n{self.log_text()[-3000:]}")


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Polls ``check`` until it returns something truthy; fails with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
