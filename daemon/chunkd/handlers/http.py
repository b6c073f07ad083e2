"""The ``http:URL`` handler: POST each chunk as JSON to a URL (e.g. a Supabase edge function).

Status mapping (spec §4): 2xx is done (a ``"$chunkd"`` key in a JSON object body appends
chunks, see :mod:`chunkd.handlers.reserved`), 408/429/5xx/timeouts/connection errors are retryable
(``Retry-After`` is honoured via :class:`~chunkd.RetryLater`), 3xx and other 4xx fail the
chunk at once. Configured headers usually carry credentials (``Authorization: Bearer …``),
so their values never appear in logs, reprs or error messages, and they live only inside the
``aiohttp`` session so that tracebacks rendered with local variables do not show them either.
While the daemon traces, each request carries the chunk span's ``traceparent`` (and
``tracestate``), so the endpoint's own tracing joins the trace.

Response bodies are streamed and read with a cap, never whole: a 2xx body above
:data:`MAX_BODY_BYTES` (the daemon's result limit) fails the chunk at once, and of an error
body only the first :data:`EXCERPT_READ_BYTES` are read for the excerpt. Either way the
connection is then closed rather than drained, so a server that sends gigabytes costs the
daemon at most the cap plus the socket buffers.

aiohttp rather than httpx: httpx's pool collapses above a few dozen concurrent requests
(``bench/http_clients.py``; the figures are in the README's Dependencies table).
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

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from chunkd.chunk import MAX_RESULT_BYTES, Chunk, PermanentError, RetryLater, too_deep
from chunkd.handlers import HandlerError
from chunkd.handlers.reserved import continuation_of
from chunkd.observability.tracing import propagation_headers
from chunkd.version import __version__

__all__ = [
    "EXCERPT_READ_BYTES",
    "MAX_BODY_BYTES",
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

#: The largest 2xx body read (bytes): the result limit. A body this size or smaller can still
#: fail as a result if its JSON re-encodes larger.
MAX_BODY_BYTES = MAX_RESULT_BYTES

_EXCERPT_CHARS = 200
#: The most of an error (non-2xx) body read for its excerpt (bytes): 200 characters are at
#: most 800 bytes of UTF-8; the rest leaves room for collapsed whitespace and for a secret to
#: be matched whole before it is redacted.
EXCERPT_READ_BYTES = 4096
_READ_SIZE = 64 * 1024
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


# Decimal: the result is stored with every number exactly as sent. One decoder for all calls
# (json.loads with hooks would build a new one per response).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=Decimal)


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
    """POSTs ``chunk.to_json_dict()`` to one URL through a pooled, lazily created session.

    One ``aiohttp.ClientSession`` per handler keeps connections alive across chunks;
    ``aclose()`` must be called at shutdown (the handler registry does this).
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
        self._target = URL(url)  # parsed once: aiohttp would parse the string per request
        self.display_url = _display_url(url)
        self.timeout_s = float(timeout_s)
        self._headers = extra
        self._secrets = _secrets_of(extra.values())
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._closed = False

    def __repr__(self) -> str:
        # Deliberately omits headers: reprs end up in logs and rich tracebacks.
        return f"HttpHandler({self.display_url!r}, timeout_s={self.timeout_s})"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("HttpHandler is closed")
        if self._session is None:
            # HTTP_PROXY / HTTPS_PROXY / NO_PROXY, looked up once: aiohttp's trust_env would
            # read the environment (and ~/.netrc) again for every request.
            try:
                self._proxy, self._proxy_auth = get_env_proxy_for_url(self._target)
            except LookupError:  # no proxy for this URL
                self._proxy, self._proxy_auth = None, None
            # Created on first use: a session belongs to the running event loop.
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"chunkd/{__version__}", **self._headers},
                # The whole request, body read included: the per-request timeout.
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                # No pool cap at all (0 = unlimited): the daemon's concurrency already bounds
                # in-flight requests, and a cap below it would only queue chunks in the pool.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                trust_env=False,
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        """Close pooled connections; further calls raise ``RuntimeError``."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __call__(self, chunk: Chunk) -> Any:
        """Send one chunk; return its result or raise to steer the retry (module docstring)."""
        session = self._get_session()
        try:
            # The payloads exactly as stored: numbers are never re-encoded.
            body = chunk.to_json()
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"chunk is not JSON-serialisable: {exc}") from None
        headers = {"Content-Type": "application/json", "Idempotency-Key": chunk.idempotency_key}
        traced = propagation_headers()  # None unless the daemon traces: the chunk's span
        if traced is not None:
            headers.update(traced)
        # `from None` everywhere below: aiohttp's exception chain carries the request (and so
        # the configured headers) in frames that some traceback renderers print.
        try:
            async with session.post(
                self._target,
                data=body.encode(),
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            ) as response:
                return await self._interpret(response)
        except TimeoutError:
            raise HttpRetryableError(
                f"timeout after {self.timeout_s:g}s calling {self.display_url}"
            ) from None
        except aiohttp.ClientError as exc:
            reason = self._scrub(str(exc) or type(exc).__name__)
            raise HttpRetryableError(
                f"connection error calling {self.display_url}: {reason}"
            ) from None

    async def _interpret(self, response: aiohttp.ClientResponse) -> Any:
        status = response.status
        prefix = f"HTTP {status} from {self.display_url}"
        if 200 <= status < 300:
            size = response.content_length  # None when not announced (chunked)
            content, more = b"", True  # announced too big: not a byte of it is read
            plain = not response.headers.get("Content-Encoding")
            if size is not None and size <= MAX_BODY_BYTES and plain:
                content, more = await response.read(), False  # exactly the announced bytes
            elif size is None or size <= MAX_BODY_BYTES:
                content, more = await _read_capped(response, MAX_BODY_BYTES)
            if more:
                response.close()  # not drained back into the pool: the rest is never read
                raise PermanentError(f"{prefix}: {_too_big(size)}")
            if not content.strip():
                return None
            try:
                value = _DECODER.decode(content.decode(json.detect_encoding(content)))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return _decode(content, response.charset)
            except RecursionError:  # JSON, too deep to read: the same reply next time
                raise PermanentError(f"{prefix}: {too_deep('the response is JSON')}") from None
            return continuation_of(value)  # "$chunkd": {"append": [...]}
        if 300 <= status < 400:
            response.close()
            raise PermanentError(f"{prefix}: redirects are not followed; configure the final URL")
        message = f"{prefix}: {await self._excerpt(response)}"
        if status in _RETRYABLE_STATUSES or status >= 500:
            delay = parse_retry_after(response.headers.get("Retry-After"))
            if delay is not None:
                raise RetryLater(delay, f"{message} (Retry-After {delay:g}s)")
            raise HttpRetryableError(message)
        raise PermanentError(message)

    async def _excerpt(self, response: aiohttp.ClientResponse) -> str:
        content, cut = await _read_capped(response, EXCERPT_READ_BYTES)
        if cut:
            response.close()  # not drained back into the pool: the rest is never read
        # Scrub before truncating, so a secret cut in half by the limit cannot slip through.
        text = self._scrub(" ".join(_decode(content, response.charset).split()))
        if cut and self._secrets:
            # The read stopped mid-body: its tail may hold the start of a secret, which the
            # scrub (whole values only) cannot recognise. Drop as much as the longest secret.
            text = text[: max(len(text) - len(self._secrets[0]), 0)]
        if not text:
            return "…" if cut else "(empty body)"
        if len(text) > _EXCERPT_CHARS or cut:
            text = text[:_EXCERPT_CHARS] + "…"
        return text

    def _scrub(self, text: str) -> str:
        # A server (or proxy) that echoes request headers back must not leak them via us.
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def _too_big(announced: int | None) -> str:
    """Why a 2xx body is refused: it announced more than the cap (``announced`` bytes, its
    Content-Length), or it announced nothing (chunked), or it announced less and outgrew the
    cap as it was decoded (a compressed body: what was sent is not what was too big)."""
    limit = f"the {MAX_BODY_BYTES}-byte result limit"
    if announced is None:
        return f"response body is above {limit} (store big results elsewhere)"
    if announced > MAX_BODY_BYTES:
        return f"response body of {announced} bytes is above {limit} (store big results elsewhere)"
    return (
        f"response body is above {limit} once decoded ({announced} bytes as sent; store big "
        "results elsewhere)"
    )


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body's first ``limit`` bytes, and whether there is more; reads at most ``limit + 1``.

    aiohttp stops reading the socket while its buffer is full, so what the server sends beyond
    this stays in the kernel's socket buffers until the caller closes the response.
    """
    parts: list[bytes] = []
    got = 0
    while got <= limit:
        part = await response.content.read(min(_READ_SIZE, limit + 1 - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)[:limit], got > limit


def _decode(content: bytes, charset: str | None) -> str:
    try:
        return content.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return content.decode("utf-8", errors="replace")
