"""The systemd units: ``systemd-analyze verify`` and ``security`` on the real files, the two
units kept in step, the env example complete, and ``MemoryDenyWriteExecute=yes`` proven safe
by running the daemon under the kernel's equivalent (``PR_SET_MDWE``)."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from chunkd.cli import cli
from chunkd.settings import RunSettings
from daemon_handlers import EXECUTIONS_DDL
from daemon_helpers import TESTS_DIR, wait_until
from sql_helpers import create_job, status_counts

SYSTEMD_DIR = TESTS_DIR.parent / "systemd"
UNITS = ("chunkd.service", "chunkd@.service")
EXEC_START = "ExecStart=/usr/local/bin/chunkd run"
MAX_EXPOSURE = 2.5
# What only the template has: the instance's own env file, name and journald tag.
INSTANCE_ONLY = {
    "EnvironmentFile=-/etc/chunkd/chunkd-%i.env",
    "Environment=CHUNKD_INSTANCE=%i",
    "SyslogIdentifier=chunkd-%i",
}


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must check the units", pytrace=False)
        pytest.skip(reason)
    return path


def _chunkd_script() -> str:
    """An existing executable for ExecStart=: verify refuses a unit whose binary is missing."""
    script = Path(sys.executable).parent / "chunkd"
    return str(script) if script.exists() else shutil.which("chunkd") or sys.executable


def _installable_copy(unit: str, directory: Path, name: str | None = None) -> Path:
    text = (SYSTEMD_DIR / unit).read_text()
    assert text.count(EXEC_START) == 1, f"{unit}: expected {EXEC_START!r}"
    target = directory / (name or unit)
    target.write_text(text.replace(EXEC_START, f"ExecStart={_chunkd_script()} run"))
    return target


def _directives(unit: str) -> list[str]:
    """``Key=value`` lines with their section, comments and blank lines dropped."""
    section, out = "", []
    for raw in (SYSTEMD_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        out.append(f"{section}{line}")
    return out


@pytest.mark.parametrize(
    ("unit", "as_name"),
    [
        ("chunkd.service", None),
        ("chunkd@.service", None),
        ("chunkd@.service", "chunkd@3.service"),  # an instance: %i expanded
    ],
)
def test_systemd_analyze_verify_is_clean(unit: str, as_name: str | None, tmp_path) -> None:
    tool = _systemd_analyze()
    path = _installable_copy(unit, tmp_path, as_name)
    result = subprocess.run(
        [tool, "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): any line about our
    # file is a failure. Lines about the host's own units are not ours to judge.
    about_us = [line for line in output.splitlines() if path.name in line or str(path) in line]
    assert result.returncode == 0 and not about_us, output


@pytest.mark.parametrize("unit", ["chunkd.service", "chunkd@.service"])
def test_security_exposure_is_at_most_2_5(unit: str, tmp_path) -> None:
    tool = _systemd_analyze()
    name = "chunkd@1.service" if "@" in unit else unit
    path = _installable_copy(unit, tmp_path, name)
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match[1])
    assert exposure <= MAX_EXPOSURE, f"{name}: exposure {exposure}\n{result.stdout}"


def test_template_has_the_same_settings_and_hardening_as_the_single_unit() -> None:
    instance_only = {f"[Service]{d}" for d in INSTANCE_ONLY}
    template = _directives("chunkd@.service")
    assert instance_only <= set(template), "the template must name its instance"

    def shared(directives: list[str]) -> list[str]:
        return [
            d for d in directives
            if d not in instance_only and not d.startswith("[Unit]Description=")
        ]  # fmt: skip

    assert shared(template) == shared(_directives("chunkd.service"))


def test_unit_timeouts_fit_the_daemon_defaults() -> None:
    settings = dict(d.removeprefix("[Service]").split("=", 1) for d in _directives(UNITS[0]))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    # systemd's SIGKILL must not cut the graceful stop short: shutdown timeout + release.
    default_shutdown_s = RunSettings(dsn="postgresql://").shutdown_timeout_s
    assert int(settings["TimeoutStopSec"]) >= default_shutdown_s + 10
    assert settings["Restart"] == "on-failure" and settings["CapabilityBoundingSet"] == ""


def test_env_example_documents_every_run_variable() -> None:
    text = (SYSTEMD_DIR / "chunkd.env.example").read_text()
    documented = set(re.findall(r"^#?(CHUNKD_[A-Z_]+)=", text, flags=re.MULTILINE))
    wanted = {"CHUNKD_HTTP_HEADERS"}  # read outside click
    for param in [*cli.params, *cli.commands["run"].params]:
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        wanted.update(e for e in envvars if e and e.startswith("CHUNKD_"))
    # --http-header's own variable is split on whitespace by click, which breaks any
    # "Name: value"; CHUNKD_HTTP_HEADERS (one header per line) is the one to document.
    wanted.discard("CHUNKD_HTTP_HEADER")
    assert wanted <= documented, sorted(wanted - documented)
    assert "CHUNKD_DSN='postgresql://" in text and "CHANGE_ME" in text


# --- MemoryDenyWriteExecute=yes ------------------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _deny_write_execute() -> None:
    """In the child before exec: what MemoryDenyWriteExecute=yes enforces (systemd ≥ 253
    uses this very prctl; older versions a seccomp filter with the same effect)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(99)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=_deny_write_execute, timeout=30
    )
    return probe.returncode == 0


def _write_execute_refused() -> bool:
    """The emulation is real: a W+X mapping fails in a process started like the daemon."""
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    result = subprocess.run(
        [sys.executable, "-c", f"import mmap; mmap.mmap(-1, 4096, prot={wx})"],
        preexec_fn=_deny_write_execute, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.returncode != 0 and "PermissionError" in result.stderr


def _start_daemon_under_mdwe(dsn: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CHUNKD_DSN=dsn, PYTHONPATH=str(TESTS_DIR))
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "chunkd.cli", "--log-format", "json", "--log-level", "debug",
             "run", "--handler", "test=daemon_handlers:record", "--handler", "echo=exec:cat",
             "--metrics-port", str(_free_port())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_deny_write_execute,
        )  # fmt: skip


async def test_daemon_runs_with_memory_deny_write_execute(
    conn: asyncpg.Connection, database, tmp_path
) -> None:
    """Python, uvloop, asyncpg, prometheus-client and an exec: child under MDWE."""
    if not _mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): cannot emulate the setting")
    assert _write_execute_refused()
    await conn.execute(EXECUTIONS_DDL)
    python_job = await create_job(conn, 3)
    exec_job = await create_job(conn, 2, kind="echo")
    log_path = tmp_path / "daemon.log"
    daemon = _start_daemon_under_mdwe(database.dsn, log_path)
    try:

        async def all_done() -> bool:
            return await status_counts(conn, python_job) == {"completed": 3} and (
                await status_counts(conn, exec_job) == {"completed": 2}
            )

        await wait_until(all_done, timeout_s=20, what="5 chunks completed under MDWE")
        daemon.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return daemon.poll() is not None

        await wait_until(exited, timeout_s=30, what="the daemon to exit on SIGTERM")
        assert daemon.returncode == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    log_text = log_path.read_text()
    assert '"chunk.completed"' in log_text and "Traceback" not in log_text, log_text[-2000:]
