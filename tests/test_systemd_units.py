"""The systemd units: ``systemd-analyze verify`` and ``security`` on the real files, the two
units kept in step, the env example complete, and ``MemoryDenyWriteExecute=yes`` proven safe
by running the daemon under the kernel's equivalent (``PR_SET_MDWE``)."""

from __future__ import annotations

import ctypes
import json
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
ALL_UNITS = (*UNITS, "chunkd-web.service")
# The virtualenv of docs/deploy.md: chunkd and the application's handler code.
CHUNKD = "/opt/chunkd/bin/chunkd"
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


def _command(unit: str) -> str:
    return "web" if unit == "chunkd-web.service" else "run"


def _installable_copy(unit: str, directory: Path, name: str | None = None) -> Path:
    text = (SYSTEMD_DIR / unit).read_text()
    exec_start = f"ExecStart={CHUNKD} {_command(unit)}"
    assert text.count(exec_start) == 1, f"{unit}: expected {exec_start!r}"
    target = directory / (name or unit)
    target.write_text(text.replace(exec_start, f"ExecStart={_chunkd_script()} {_command(unit)}"))
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
        ("chunkd-web.service", None),
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


@pytest.mark.parametrize("unit", ALL_UNITS)
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


def _service(unit: str) -> dict[str, str]:
    """The unit's [Service] settings (the last value of a key given twice)."""
    return dict(
        d.removeprefix("[Service]").split("=", 1)
        for d in _directives(unit)
        if d.startswith("[Service]")
    )


def _hardening(unit: str) -> list[str]:
    """The directives from NoNewPrivileges= to the end of [Service]: the sandbox."""
    directives = [d for d in _directives(unit) if d.startswith("[Service]")]
    return directives[directives.index("[Service]NoNewPrivileges=yes") :]


def test_the_web_unit_has_the_daemons_hardening_and_its_own_settings() -> None:
    assert _hardening("chunkd-web.service") == _hardening("chunkd.service")
    web = _service("chunkd-web.service")
    assert web["Type"] == "exec" and web["ExecStart"] == f"{CHUNKD} web"
    assert web["EnvironmentFile"] == "/etc/chunkd/chunkd-web.env"
    assert web["DynamicUser"] == "yes" and web["User"] == "chunkd-web"
    # SIGKILL must not cut the graceful stop short: uvicorn's own limit, plus margin.
    from chunkd.cli.web import _server

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never served")

    graceful_s = _server(app).config.timeout_graceful_shutdown  # type: ignore[arg-type]
    assert int(web["TimeoutStopSec"]) >= graceful_s + 10


def test_the_daemon_units_work_in_the_virtualenv_not_in_the_root() -> None:
    """CHUNKD_APP_DIR defaults to the working directory, which ``chunkd run`` puts first on
    the import path: without ``WorkingDirectory=`` that is ``/``. The units set it to the
    virtualenv of docs/deploy.md (its ExecStart's), and the env example and the docs say so."""
    venv = CHUNKD.removesuffix("/bin/chunkd")
    for unit in UNITS:
        assert _service(unit).get("WorkingDirectory") == venv, unit
    example = (SYSTEMD_DIR / "chunkd.env.example").read_text()
    assert f"WorkingDirectory={venv}" in example
    assert re.search(r"^#CHUNKD_APP_DIR=/opt/myapp$", example, flags=re.MULTILINE), example
    deploy = (TESTS_DIR.parent / "docs" / "deploy.md").read_text()
    assert f"`WorkingDirectory={venv}`" in deploy
    assert "looked in / and" not in deploy and "which is `/` under" not in deploy


def _exit_code(*args: str, dsn: str) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "chunkd.cli", *args],
        env={**os.environ, "CHUNKD_DSN": dsn, "PYTHONPATH": str(TESTS_DIR)},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stderr.startswith("chunkd: error: "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.returncode


def test_a_configuration_error_stops_the_unit_and_an_unreachable_database_restarts_it(
    database,
) -> None:
    """The exit codes the commands really return, against each unit's restart settings:
    a configuration error (a handler that does not import; a host without a token) is not
    restarted, a database that cannot be reached (nothing listens on port 1) is."""
    unreachable = "postgresql://chunkd@127.0.0.1:1/app"
    codes = {
        "run": (
            _exit_code("run", "--handler", "x=no_such_module:handle", dsn=database.dsn),
            _exit_code("run", "--handler", "x=bad_handlers:echo", dsn=unreachable),
        ),
        "web": (
            _exit_code("web", "--host", "0.0.0.0", "--port", "0", dsn=database.dsn),
            _exit_code("web", "--port", "0", dsn=unreachable),
        ),
    }
    assert codes == {"run": (2, 75), "web": (2, 75)}
    for unit in ALL_UNITS:
        service = _service(unit)
        configuration_error, unavailable = codes[_command(unit)]
        assert service["Restart"] == "on-failure" and service["RestartSec"] == "5", unit
        prevented = {int(code) for code in service["RestartPreventExitStatus"].split()}
        assert configuration_error in prevented and unavailable not in prevented, unit


def test_web_env_example_documents_every_web_variable() -> None:
    text = (SYSTEMD_DIR / "chunkd-web.env.example").read_text()
    documented = set(re.findall(r"^#?(CHUNKD_[A-Z_]+)=", text, flags=re.MULTILINE))
    wanted = {"CHUNKD_WEB_TOKEN"}  # read outside click
    for param in [*cli.params, *cli.commands["web"].params]:
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        wanted.update(e for e in envvars if e and e.startswith("CHUNKD_"))
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


def _start_web_under_mdwe(dsn: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    env["CHUNKD_DSN"] = dsn
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "chunkd.cli", "--log-format", "json", "web", "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_deny_write_execute,
        )  # fmt: skip


async def test_web_runs_with_memory_deny_write_execute(database, tmp_path) -> None:
    """chunkd web (uvicorn, uvloop, asyncpg, jinja2) serves pages under MDWE and stops on
    SIGTERM with exit 0, as chunkd-web.service runs it."""
    if not _mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): cannot emulate the setting")
    import httpx

    log_path = tmp_path / "web.log"
    web = _start_web_under_mdwe(database.dsn, log_path)
    try:

        async def listening() -> str | None:
            assert web.poll() is None, log_path.read_text()
            for line in log_path.read_text().splitlines():
                if '"web.listening"' in line:
                    return str(json.loads(line)["url"])
            return None

        url = await wait_until(listening, timeout_s=20, what="chunkd web to listen under MDWE")
        async with httpx.AsyncClient() as client:
            for path in ("jobs", "workers", "static/app.js"):
                assert (await client.get(url + path, timeout=10)).status_code == 200, path
        web.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return web.poll() is not None

        await wait_until(exited, timeout_s=20, what="chunkd web to exit on SIGTERM")
        assert web.returncode == 0
    finally:
        if web.poll() is None:
            web.kill()
            web.wait()
    assert "Traceback" not in log_path.read_text()
