"""The ``http:URL`` handler: POST each chunk as JSON to a URL (e.g. a Supabase edge function).

Status mapping (spec §4): 2xx is done (a ``"$chunkd"`` key in a JSON object body appends
chunks, see :mod:`chunkd.handlers.reserved`), 408/429/5xx/timeouts/connection errors are retryable
(``Retry-After`` is honoured via :class:`~chunkd.RetryLater`), 3xx and other 4xx fail the
chunk at once. Configured headers usually carry credentials (``Authorization: Bearer …``),
so their values never appear in logs, reprs or error messages, and they live only inside the
``httpx`` client so that tracebacks rendered with local variables do not show them either.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from chunkd.chunk import Chunk, PermanentError, RetryLater, too_deep
from chunkd.handlers import HandlerError
from chunkd.handlers.reserved import continuation_of
from chunkd.version import __version__

__all__ = [
    "MAX_RETRY_AFTER_S",
    "HttpHandler",
    "HttpRetryableError",
    "headers_from_env",
    "parse_header_option",
    "parse_retry_after",
]

#: Upper bound for a server-requested ``Retry-After``: a misbehaving server must not be able
#: to park a chunk for days.
MAX_RETRY_AFTER_S = 3600.0

_EXCERPT_CHARS = 200
_RETRYABLE_STATUSES = frozenset({408, 429})
# RFC 9110 token characters: what a header name may contain.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DELTA_SECONDS_RE = re.compile(r"^\d+(?:\.\d+)?$")
# Header values shorter than this are not scrubbed from excerpts: redacting "1" or "on"
# everywhere would mangle messages without protecting anything.
_MIN_SCRUB_LEN = 4
_MIN_SECRET_WORD_LEN = 8


class HttpRetryableError(RuntimeError):
    """A failure worth retrying with the daemon's own backoff (no ``Retry-After`` given)."""


def parse_header_option(value: str) -> tuple[str, str]:
    """Split a ``'Name: value'`` header option.

    Error messages never echo the input: a malformed line is quite likely a token pasted in
    the wrong place, and start-up errors end up in logs.
    """
    name, sep, header_value = value.partition(":")
    name, header_value = name.strip(), header_value.strip()
    if not sep:
        raise ValueError("HTTP header must look like 'Name: value' (no ':' found)")
    if not name or not _TOKEN_RE.match(name):
        raise ValueError(
            "HTTP header name is missing or invalid (it must be a token such as "
            "'Authorization', before the ':')"
        )
    if not header_value:
        # Almost always an unset variable in "Name: $VALUE": fail at start-up, not per chunk.
        raise ValueError(f"HTTP header {name!r} has an empty value")
    if any(ch in header_value for ch in "\r\n\0"):
        raise ValueError(f"HTTP header {name!r} value contains a control character")
    return name, header_value


def headers_from_env(text: str) -> dict[str, str]:
    """Parse ``CHUNKD_HTTP_HEADERS``: one ``Name: value`` per line.

    Blank lines and lines starting with ``#`` are skipped so the variable can be kept in a
    readable env file. A name given twice (case-insensitively) is an error rather than a
    silent override, because which credential wins would otherwise be a guess.
    """
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            name, value = parse_header_option(stripped)
        except ValueError as exc:
            raise ValueError(f"CHUNKD_HTTP_HEADERS line {lineno}: {exc}") from None
        if name.lower() in seen:
            raise ValueError(f"CHUNKD_HTTP_HEADERS line {lineno}: header {name!r} given twice")
        seen.add(name.lower())
        headers[name] = value
    return headers


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    Returns ``None`` for a missing or unparseable value (the daemon's backoff then applies),
    and clamps the result to ``[0, MAX_RETRY_AFTER_S]``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS_RE.match(value):
        delay = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" means UTC with unknown local offset
            when = when.replace(tzinfo=UTC)
        delay = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(delay):
        return None
    return min(max(delay, 0.0), MAX_RETRY_AFTER_S)


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON and Postgres jsonb would refuse them when storing the result.
    raise ValueError(f"non-standard JSON constant {name}")


def _secrets_of(values: Iterable[str]) -> tuple[str, ...]:
    """Strings to redact: each header value and its long words ("Bearer <token>" → token)."""
    found: set[str] = set()
    for value in values:
        if len(value) >= _MIN_SCRUB_LEN:
            found.add(value)
        found.update(word for word in value.split() if len(word) >= _MIN_SECRET_WORD_LEN)
    # Longest first, so a full value is replaced before any of its words.
    return tuple(sorted(found, key=len, reverse=True))


def _display_url(url: str) -> str:
    """The URL without credentials or query string, safe to put in error messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


class HttpHandler:
    """POSTs ``chunk.to_json_dict()`` to one URL through a pooled, lazily created client.

    One client per handler keeps connections alive across chunks; ``aclose()`` must be
    called at shutdown (the handler registry does this).
    """

    def __init__(
        self,
        spec: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        url = spec.strip()
        # Tolerate "http:https://host/x" (the KIND=http:URL form with the prefix kept).
        prefix, _, rest = url.partition(":")
        if prefix == "http" and rest.startswith(("http://", "https://")):
            url = rest
        # The spec is never echoed below: URLs can carry credentials (user:pw@, ?key=).
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise HandlerError("http handler needs an http:// or https:// URL")
        if not parts.hostname:
            raise HandlerError("http handler URL has no host")
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise HandlerError("http handler URL has an invalid port") from None
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise HandlerError(f"http handler timeout must be a positive number, got {timeout_s}")
        extra: dict[str, str] = {}
        for name, value in (headers or {}).items():
            # Validate here so a bad header is a start-up error, not a failure per chunk.
            try:
                checked_name, checked_value = parse_header_option(f"{name}: {value}")
            except ValueError as exc:
                raise HandlerError(str(exc)) from None
            extra[checked_name] = checked_value
        self.url = url
        self.display_url = _display_url(url)
        self.timeout_s = float(timeout_s)
        self._headers = extra
        self._secrets = _secrets_of(extra.values())
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        # Deliberately omits headers: reprs end up in logs and rich tracebacks.
        return f"HttpHandler({self.display_url!r}, timeout_s={self.timeout_s})"

    def _get_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("HttpHandler is closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers={"User-Agent": f"chunkd/{__version__}", **self._headers},
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                # The daemon's concurrency already bounds in-flight requests; a pool cap
                # below it would only turn into misleading pool timeouts.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
        return self._client

    async def aclose(self) -> None:
        """Close pooled connections; further calls raise ``RuntimeError``."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, chunk: Chunk) -> Any:
        """Send one chunk; return its result or raise to steer the retry (module docstring)."""
        client = self._get_client()
        try:
            # The payloads exactly as stored: numbers are never re-encoded.
            body = chunk.to_json()
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"chunk is not JSON-serialisable: {exc}") from None
        # `from None` everywhere below: the httpx exception chain carries the request
        # (and so the configured headers) in frames that some traceback renderers print.
        try:
            response = await client.post(
                self.url,
                content=body.encode(),
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": chunk.idempotency_key,
                },
            )
        except httpx.TimeoutException:
            raise HttpRetryableError(
                f"timeout after {self.timeout_s}s calling {self.display_url}"
            ) from None
        except httpx.TransportError as exc:
            reason = self._scrub(str(exc) or type(exc).__name__)
            raise HttpRetryableError(
                f"connection error calling {self.display_url}: {reason}"
            ) from None
        return self._interpret(response)

    def _interpret(self, response: httpx.Response) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            if not response.content.strip():
                return None
            try:
                # Decimal: the result is stored with every number exactly as sent.
                value = json.loads(
                    response.content, parse_constant=_reject_constant, parse_float=Decimal
                )
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return response.text
            except RecursionError:  # JSON, too deep to read: the same reply next time
                raise PermanentError(
                    f"HTTP {status} from {self.display_url}: {too_deep('the response is JSON')}"
                ) from None
            return continuation_of(value)  # "$chunkd": {"append": [...]}
        prefix = f"HTTP {status} from {self.display_url}"
        if 300 <= status < 400:
            raise PermanentError(f"{prefix}: redirects are not followed; configure the final URL")
        message = f"{prefix}: {self._excerpt(response)}"
        if status in _RETRYABLE_STATUSES or status >= 500:
            delay = parse_retry_after(response.headers.get("Retry-After"))
            if delay is not None:
                raise RetryLater(delay, f"{message} (Retry-After {delay:g}s)")
            raise HttpRetryableError(message)
        raise PermanentError(message)

    def _excerpt(self, response: httpx.Response) -> str:
        # Scrub before truncating, so a secret cut in half by the limit cannot slip through.
        text = self._scrub(" ".join(response.text.split()))
        if not text:
            return "(empty body)"
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "…"
        return text

    def _scrub(self, text: str) -> str:
        # A server (or proxy) that echoes request headers back must not leak them via us.
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text
