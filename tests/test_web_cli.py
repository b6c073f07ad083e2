"""``chunkd web`` as a user starts it: the refusals at start are one line and exit 2, the
token comes from a file or the environment, and SIGTERM ends it promptly, open event streams
included."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sql_helpers import create_job
from web_helpers import TOKEN


def _web(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "chunkd.cli", "web", *args],
        capture_output=True, text=True, timeout=60, env=full_env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _one_error_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunkd: error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "dashboard.example"])
def test_a_host_beyond_loopback_without_a_token_is_refused(database, host: str) -> None:
    line = _one_error_line(_web("--dsn", database.dsn, "--host", host, "--port", "0"))
    assert f"--host {host} reaches beyond this machine" in line and "token" in line


def test_bad_tokens_and_token_files_are_one_line(database, tmp_path: Path) -> None:
    short = _web("--dsn", database.dsn, env={"CHUNKD_WEB_TOKEN": "short"})
    assert "at least 16 characters" in _one_error_line(short)
    missing = _web("--dsn", database.dsn, "--token-file", str(tmp_path / "nope"))
    assert "cannot read --token-file" in _one_error_line(missing)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in _one_error_line(_web("--dsn", database.dsn, "--token-file", str(empty)))


def test_a_port_in_use_is_one_line(database) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = _one_error_line(_web("--dsn", database.dsn, "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    dsn = "postgresql://u:Sup3r-Secret@127.0.0.1:1/app?connect_timeout=2"
    # 75 (EX_TEMPFAIL): the database may come up; chunkd-web.service restarts it then.
    line = _one_error_line(_web("--dsn", dsn, "--port", "0"), code=75)
    assert "cannot connect" in line and "Sup3r-Secret" not in line


def test_a_schema_not_migrated_is_one_line(empty_database: str) -> None:
    line = _one_error_line(_web("--dsn", empty_database, "--port", "0"))
    assert "chunkd migrate" in line


def test_every_option_reads_its_environment_variable() -> None:
    help_text = _web("--help").stdout
    for variable in ("CHUNKD_DSN", "CHUNKD_HOST", "CHUNKD_PORT", "CHUNKD_TOKEN_FILE",
                     "CHUNKD_WEB_TOKEN", "CHUNKD_REFRESH", "CHUNKD_STALE_AFTER"):  # fmt: skip
        assert variable in help_text, variable


async def test_token_file_beyond_loopback_and_a_prompt_stop(
    conn, database, start_web, tmp_path: Path
) -> None:
    """Bound to all addresses with a token from a file (env vars for every option): a
    request without the token is refused; an open event stream does not hold up SIGTERM."""
    job = await create_job(conn, 2)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    web = start_web(
        env={"CHUNKD_HOST": "0.0.0.0", "CHUNKD_PORT": "0", "CHUNKD_TOKEN_FILE": str(token_file)}
    )
    await web.listening()
    assert web.url.startswith("http://0.0.0.0:")
    url = web.local_url()
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get(f"/api/jobs/{job}")).status_code == 401
        assert (await http.get("/jobs")).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await http.get(f"/api/jobs/{job}", headers=bearer)).status_code == 200
        async with http.stream("GET", f"/api/jobs/{job}/events", headers=bearer) as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            started = asyncio.get_running_loop().time()
            assert await web.stop(timeout_s=15) == 0
            assert asyncio.get_running_loop().time() - started < 10
    assert TOKEN not in web.log_text()
