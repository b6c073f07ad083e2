"""``chunkd status --watch``: live progress through a real terminal (tmux), and as NDJSON.

The tmux tests start the command in a detached tmux server of their own (private socket, fixed
window size), move chunks forward through the SQL API meanwhile, and read the screen back with
``tmux capture-pane``: what an operator would see, including that the command ends by itself
once the job is finished, and that Ctrl-C ends it cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_helpers import wait_until
from sql_helpers import claim, complete, create_job
from test_cli_ops import _restore_logging, run_cli

__all__ = ["_restore_logging"]  # the autouse fixture, re-exported so it applies here too

WIDTH, HEIGHT = 160, 30
EXIT_MARK = "[chunkd exited "


class Tmux:
    """One private tmux server with one session running one shell command."""

    def __init__(self, tmux: str, socket_dir: Path) -> None:
        self._tmux = tmux
        self._socket = str(socket_dir / "tmux.sock")

    def _run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [self._tmux, "-S", self._socket, "-f", os.devnull, *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        # The shell prints the exit status and keeps the pane open, so the last frame and the
        # status can be read after the command has ended. It traps SIGINT (Ctrl-C goes to the
        # whole foreground group) to survive it; a trapped signal is reset in the child.
        shell = f"trap : INT; {command}; echo '{EXIT_MARK}'$?']'; exec sleep 600"
        self._run(
            "new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "watch",
            "sh", "-c", shell, env=env,
        )  # fmt: skip

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "watch")

    def send_keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "watch", *keys)

    def kill(self) -> None:
        subprocess.run(
            [self._tmux, "-S", self._socket, "kill-server"],
            capture_output=True,
            timeout=10,
            check=False,
        )


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    found = shutil.which("tmux")
    if found is None:
        message = "tmux is needed to test `chunkd status --watch` in a real terminal"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    socket_dir = Path(tempfile.mkdtemp(prefix="chunkd-tmux-"))  # short: sockets have a limit
    server = Tmux(found, socket_dir)
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _chunkd(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "chunkd.cli", *args])


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TMUX", "CHUNKD_"))}
    env.update(CHUNKD_DSN=dsn, TERM="xterm-256color", LANG="C.UTF-8")
    env.pop("NO_COLOR", None)
    return env


async def _screen_with(tmux: Tmux, *needles: str, what: str) -> str:
    async def check() -> str | None:
        screen = await asyncio.to_thread(tmux.screen)
        return screen if all(n in screen for n in needles) else None

    return await wait_until(check, timeout_s=20, what=what, interval_s=0.05)


async def test_watch_draws_progress_and_exits_when_the_job_is_done(database, conn, tmux) -> None:
    job = await create_job(conn, 4, kind="mail")
    rows = list(await claim(conn, "w", 4))
    await complete(conn, rows[0]["queue_id"], "w", 1)

    await asyncio.to_thread(
        tmux.start, _chunkd("status", "--watch", "--interval", "0.1"), _env(database.dsn)
    )
    screen = await _screen_with(tmux, str(job), "25.00%", what="the first frame at 25%")
    row = next(line for line in screen.splitlines() if str(job) in line)
    assert "━" in row and "processing" in row  # a drawn bar, not just a number
    assert EXIT_MARK not in screen  # still watching: the job is not finished

    for r in rows[1:3]:
        await complete(conn, r["queue_id"], "w", 1)
    await _screen_with(tmux, "75.00%", what="the redraw at 75%")

    await complete(conn, rows[3]["queue_id"], "w", 1)
    screen = await _screen_with(tmux, EXIT_MARK, what="watch to exit by itself")
    assert f"{EXIT_MARK}0]" in screen
    row = next(line for line in screen.splitlines() if str(job) in line)
    assert "100.00%" in row and "completed" in row
    # Redrawn in place: one table on screen, not one per refresh.
    assert screen.count(str(job)) == 1
    assert "Traceback" not in screen


async def test_watch_one_job_until_ctrl_c(database, conn, tmux) -> None:
    # Nobody handles this kind, so the job never finishes: only Ctrl-C ends the watch.
    job = await create_job(conn, 3, kind="nobody-runs-this")
    await asyncio.to_thread(
        tmux.start, _chunkd("status", str(job), "--watch", "--interval", "0.1"), _env(database.dsn)
    )
    screen = await _screen_with(
        tmux,
        "no live worker handles kind 'nobody-runs-this'",
        "0.00%",
        what="the job view with its note",
    )
    assert "3 total: 3 pending" in screen
    await asyncio.to_thread(tmux.send_keys, "C-c")
    screen = await _screen_with(tmux, EXIT_MARK, what="watch to stop on Ctrl-C")
    assert f"{EXIT_MARK}130]" in screen
    assert "Traceback" not in screen


async def test_watch_json_streams_one_document_per_refresh(database, conn) -> None:
    job = await create_job(conn, 3)
    rows = list(await claim(conn, "w", 3))
    watching = asyncio.create_task(
        run_cli("status", str(job), "--watch", "--json", "--interval", "0.05", dsn=database.dsn)
    )
    for r in rows:
        await complete(conn, r["queue_id"], "w", 1)
    result = await asyncio.wait_for(watching, timeout=20)  # ends by itself once terminal
    assert result.exit_code == 0, result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert docs and {d["sync_job_id"] for d in docs} == {str(job)}
    assert docs[-1]["overall_status"] == "completed" and docs[-1]["completed_chunks"] == 3
    assert all(d["overall_status"] != "completed" for d in docs[:-1])


async def test_watch_without_a_terminal_prints_the_final_table(database, conn) -> None:
    job = await create_job(conn, 1)
    (row,) = await claim(conn, "w", 1)
    await complete(conn, row["queue_id"], "w", 1)
    result = await run_cli("status", "--watch", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert str(job) in result.stdout and "100.00%" in result.stdout

    missing = uuid.uuid4()
    result = await run_cli("status", str(missing), "--watch", dsn=database.dsn)
    assert result.exit_code == 2 and result.error_line() == f"no sync job {missing}"


async def test_watch_reports_a_cut_connection_in_one_line(database, conn) -> None:
    job = await create_job(conn, 2)
    watching = asyncio.create_task(
        run_cli("status", str(job), "--watch", "--json", "--interval", "0.05", dsn=database.dsn)
    )

    async def cli_backends() -> list[int]:
        return [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = 'chunkd-cli' AND datname = current_database()"
            )
        ]

    for pid in await wait_until(cli_backends, timeout_s=20, what="the watch's connection"):
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
    result = await asyncio.wait_for(watching, timeout=20)
    assert result.exit_code == 75  # EX_TEMPFAIL: running it again may work
    assert result.error_line().startswith("database unavailable, try again: ")
