"""The settings of ``chunkd web``: one frozen, validated object, durations in seconds (``_s``).

The security rule lives here so it holds however the app is started: bound to anything but a
loopback address, the dashboard refuses to start without an operator token.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["MIN_TOKEN_LENGTH", "WebSettings", "is_loopback"]

MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``; False for everything
    else, ``0.0.0.0``, ``::`` and other host names included (they may resolve anywhere)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebSettings:
    """``dsn``: where the queue lives; ``host``/``port``: where to listen (port 0 = any free
    port); ``token``: the operator token (None = none: then only a loopback ``host`` is
    allowed); ``refresh_s``: how often pages and the event stream re-read progress;
    ``stale_after_s``: a worker silent this long is shown as stale (None: one that missed
    three of its heartbeats, as the reaper counts); ``pool_size``: database
    connections; ``lock_wait_s``: how long an operator action keeps trying for locks other
    sessions hold (50 ms at a time, at most 200 ms), then answers with one line naming the
    session. Raises ValueError, with a message for the user, on an unsafe or invalid
    combination."""

    dsn: str
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    refresh_s: float = 2.0
    stale_after_s: float | None = None
    pool_size: int = 4
    lock_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the operator token must be at least {MIN_TOKEN_LENGTH} characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"--host {self.host} reaches beyond this machine: give an operator token "
                "(--token-file PATH or CHUNKD_WEB_TOKEN), or bind to 127.0.0.1"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.refresh_s < 0.1:
            raise ValueError("--refresh must be at least 100ms")
        if self.stale_after_s is not None and self.stale_after_s <= 0:
            raise ValueError("--stale-after must be positive")
        if not 0 <= self.lock_wait_s <= 3600:
            raise ValueError("--lock-wait must be 0 to 3600 seconds")
        if self.pool_size < 1:
            raise ValueError("the pool needs at least one connection")
