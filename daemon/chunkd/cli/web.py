"""``chunkd web``: the dashboard and the progress API (:mod:`chunkd.web`), served by uvicorn.

The listening socket is bound here, before uvicorn starts, so a port in use or an address
that is not this machine's is one line and exit 2. SIGTERM/SIGINT end the open event streams,
let requests in progress finish, close the pool and exit 0; a second signal closes the
connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chunkd.cli.options import (
    DURATION,
    dsn_option,
    heartbeats_or_stale_after_option,
    lock_wait_option,
    run_async,
)
from chunkd.errors import ChunkdError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from chunkd.web import WebSettings

__all__ = ["web"]

TOKEN_ENV = "CHUNKD_WEB_TOKEN"


def _read_token(token_file: Path | None) -> str | None:
    """The operator token: the first line of ``--token-file``, else ``CHUNKD_WEB_TOKEN``."""
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ChunkdError(f"cannot read --token-file {token_file}: {reason}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ChunkdError(f"--token-file {token_file} is empty")
        return token
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    return from_env or None


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise ChunkdError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@click.command()
@dsn_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="CHUNKD_HOST",
    help="Address to listen on; anything but a loopback address needs a token.  [env: CHUNKD_HOST]",
)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=8080,
    show_default=True,
    envvar="CHUNKD_PORT",
    help="Port to listen on (0: any free port).  [env: CHUNKD_PORT]",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="CHUNKD_TOKEN_FILE",
    help="File whose first line is the operator token; or set CHUNKD_WEB_TOKEN.  "
    "[env: CHUNKD_TOKEN_FILE]",
)
@click.option(
    "--refresh",
    type=DURATION,
    default="2s",
    show_default=True,
    envvar="CHUNKD_REFRESH",
    help="How often pages and event streams re-read progress.  [env: CHUNKD_REFRESH]",
)
@heartbeats_or_stale_after_option("is shown as stale")
@lock_wait_option
def web(
    dsn: str,
    host: str,
    port: int,
    token_file: Path | None,
    refresh: float,
    stale_after: float | None,
    lock_wait: float,
) -> None:
    """Serve the web dashboard and the progress API (JSON, server-sent events)."""
    from chunkd.web import WebSettings

    try:
        settings = WebSettings(
            dsn=dsn,
            host=host,
            port=port,
            token=_read_token(token_file),
            refresh_s=refresh,
            stale_after_s=stale_after,
            lock_wait_s=lock_wait,
        )
    except ValueError as exc:
        raise ChunkdError(str(exc)) from None
    sock = _bind(settings.host, settings.port)
    try:
        run_async(_serve(settings, sock))
    finally:
        sock.close()


async def _serve(settings: WebSettings, sock: socket.socket) -> None:
    import structlog

    from chunkd.db import connect, create_pool
    from chunkd.db.migrate import check_version
    from chunkd.redact import redact_dsn
    from chunkd.web import create_app

    conn = await connect(settings.dsn, application_name="chunkd-web")
    try:
        await check_version(conn)  # the version only: a read-only role runs the dashboard
    finally:
        await conn.close()
    pool = await create_pool(settings.dsn, size=settings.pool_size)
    try:
        app = create_app(settings, pool)
        server = _server(app)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # First signal: end the event streams, stop accepting, let requests finish;
            # a second one: close connections at once.
            if server.should_exit:
                server.force_exit = True
            app.state.stopping.set()
            server.should_exit = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        structlog.get_logger("chunkd.web").info(
            "web.listening",
            url=f"http://{shown}:{port}/",
            dsn=redact_dsn(settings.dsn),
            token_required=settings.token is not None,
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    finally:
        await pool.close()


def _server(app: Starlette) -> Any:
    """uvicorn's server without its own signal handling (this command installs the
    handlers, and exits 0 after a graceful stop instead of re-raising the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    return Server(config)
