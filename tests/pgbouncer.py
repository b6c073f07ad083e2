"""A real PgBouncer in front of the test server, in ``pool_mode = transaction`` (as Supabase's
port 6543 and most PgBouncer deployments run it) or ``session``, for the pooler tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _server_of(dsn: str) -> tuple[str, str, str, str | None]:
    """host (or socket directory), port, user and password of a libpq URI."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = query.get("port", [str(parts.port or 5432)])[0]
    user = unquote(parts.username or "postgres")
    password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
    return host, port, user, password


@contextlib.contextmanager
def pgbouncer(binary: str, server_dsn: str, pool_mode: str = "transaction") -> Iterator[str]:
    """Runs PgBouncer for the server of ``server_dsn``; yields a DSN template with ``{db}``."""
    host, port, user, password = _server_of(server_dsn)
    base = Path(tempfile.mkdtemp(prefix="chunkd-pgbouncer-"))
    listen_port = _free_port()
    server = f"host={host} port={port}"
    if password:  # a server that asks for one: every pooled connection logs in as this user
        server += f" user={user} password={password}"
    (base / "users.txt").write_text(f'"{user}" ""\n')
    (base / "pgbouncer.ini").write_text(
        f"""[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {base / "users.txt"}
pool_mode = {pool_mode}
max_client_conn = 500
default_pool_size = 20
logfile = {base / "pgbouncer.log"}
"""
    )
    kwargs: dict[str, object] = {}
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        account = pwd.getpwnam("postgres")
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        for path in (base, *base.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
    base.chmod(0o755)
    process = subprocess.Popen(
        [binary, str(base / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", listen_port), timeout=1),
            ):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                log = base / "pgbouncer.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise RuntimeError(f"PgBouncer did not start:\n{tail}")
            time.sleep(0.05)
        yield f"postgresql://{quote(user)}@127.0.0.1:{listen_port}/{{db}}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)
