"""Who may use the dashboard, and how a page is protected once it is served.

- **Operator token** (optional on loopback, required beyond): every request carries it, as
  ``Authorization: Bearer TOKEN`` (the API) or a session cookie set by the login form.
  Without it: 401 (the login form for pages, JSON for ``/api/``). Only ``/login`` and the
  static CSS/JS, which are the same for everyone, are served without it.
- **Host check** without a token: a request must name a loopback host, so a web page that
  rebinds its own DNS name to 127.0.0.1 cannot read the dashboard.
- **CSRF**: every POST carries a form token, an HMAC of a random per-browser cookie under a
  key of this server; a cross-site page can neither read that cookie nor compute the HMAC.
  A POST whose ``Origin`` is not this server's is refused as well.
- **Headers**: a strict Content-Security-Policy (scripts only from this server), no framing,
  no sniffing, no caching of pages.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from chunkd.web.settings import is_loopback

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "Guard",
    "Keys",
    "cookie_header",
    "origin_ok",
]

SESSION_COOKIE = "chunkd_session"
CSRF_COOKIE = "chunkd_csrf"
SESSION_LIFETIME_S = 12 * 3600

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        b"form-action 'self'; base-uri 'none'; object-src 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class Keys:
    """The operator token (or None) and the keys derived for sessions and CSRF. With a token,
    the keys derive from it, so sessions survive a restart and work across several servers
    given the same token; without one, the CSRF key is random per process."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        seed = token.encode() if token is not None else secrets.token_bytes(32)
        self._session_key = hmac.new(seed, b"chunkd-web session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(seed, b"chunkd-web csrf", hashlib.sha256).digest()

    def bearer_ok(self, authorization: str | None) -> bool:
        if self.token is None or not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token.encode()
        )

    def token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self, now_s: float | None = None) -> str:
        issued = str(int(time.time() if now_s is None else now_s))
        return f"{issued}.{self._mac(self._session_key, issued)}"

    def session_ok(self, cookie: str | None, now_s: float | None = None) -> bool:
        if not cookie or "." not in cookie:
            return False
        issued, _, mac = cookie.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(
            mac, self._mac(self._session_key, issued)
        ):
            return False
        age_s = (time.time() if now_s is None else now_s) - int(issued)
        return -60 <= age_s <= SESSION_LIFETIME_S

    def csrf_token(self, nonce: str) -> str:
        return self._mac(self._csrf_key, nonce)

    def csrf_ok(self, nonce: str | None, sent: str | None) -> bool:
        return bool(nonce and sent) and hmac.compare_digest(
            str(sent).encode(), self.csrf_token(str(nonce)).encode()
        )

    @staticmethod
    def _mac(key: bytes, text: str) -> str:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def cookie_header(name: str, value: str, *, secure: bool, max_age_s: int | None) -> bytes:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Strict, for the whole site."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age_s is not None:
        parts.append(f"Max-Age={max_age_s}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode()


def _cookies(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                if key:
                    found.setdefault(key, val)
    return found


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _host_name(host_header: str | None) -> str:
    host = (host_header or "").strip()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: the Host check, authentication, the CSRF cookie and the headers.

    ``refuse(scope, status, reason)`` answers a refused request (the login form, or JSON for
    the API); it is an ASGI app the middleware calls instead of the route."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Keys,
        refuse: Callable[[Scope, int, str], ASGIApp],
    ) -> None:
        self.app = app
        self.keys = keys
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        cookies = _cookies(scope)
        state = scope.setdefault("state", {})
        nonce = cookies.get(CSRF_COOKIE)
        new_nonce = None
        if not nonce or len(nonce) != 32:
            nonce = new_nonce = secrets.token_hex(16)
        state["csrf_nonce"] = nonce
        state["csrf_token"] = self.keys.csrf_token(nonce)
        secure = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += _HEADERS
                if not path.startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                if new_nonce is not None:
                    headers.append(
                        (
                            b"set-cookie",
                            cookie_header(CSRF_COOKIE, new_nonce, secure=secure, max_age_s=None),
                        )
                    )
                message["headers"] = headers
            await send(message)

        app = self.app
        if self.keys.token is None:
            if not is_loopback(_host_name(_header(scope, b"host"))):
                app = self.refuse(scope, 400, "this dashboard answers only to a loopback host name")
        elif not (path == "/login" or path.startswith("/static/")):
            authorized = self.keys.bearer_ok(_header(scope, b"authorization")) or (
                self.keys.session_ok(cookies.get(SESSION_COOKIE))
            )
            state["authenticated"] = authorized
            if not authorized:
                app = self.refuse(scope, 401, "the operator token is required")
        await app(scope, receive, send_with_headers)


def origin_ok(scope: Scope) -> bool:
    """A POST's ``Origin`` (when the browser sends one) must be this server itself."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    host = _header(scope, b"host") or ""
    scheme = scope.get("scheme", "http")
    return origin == f"{scheme}://{host}"
