"""Values as a page shows them: durations, rates, short ids, and payloads that never show a
secret (values of secret-looking keys are masked, and the text is truncated)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

__all__ = [
    "PAYLOAD_LIMIT_CHARS",
    "STATES",
    "duration",
    "eta",
    "rate",
    "redact_payload",
    "shown_payload",
    "timestamp",
    "tokens",
]

PAYLOAD_LIMIT_CHARS = 2000
MASK = "***"

# Keys whose values a page never shows, whatever the payload's author called them.
_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|auth|credential|cookie|session|private"
    r"|signature|dsn|(^|[-_])key$",
    re.IGNORECASE,
)
# Credentials inside strings: user:password@ in URLs, bearer tokens.
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")

# The chunk map's one-character states (sql/web.sql, web_chunk_map), for legends and tests.
STATES = {
    "p": "pending",
    "w": "waiting",
    "r": "processing",
    "c": "completed",
    "f": "failed",
    "x": "cancelled",
}


def redact_payload(value: Any) -> Any:
    """A copy of a decoded JSON value with the values of secret-looking keys masked and
    credentials inside strings removed."""
    if isinstance(value, dict):
        return {
            k: MASK if _SECRET_KEY.search(str(k)) else redact_payload(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_payload(v) for v in value]
    if isinstance(value, str):
        return _BEARER.sub(r"\1" + MASK, _URL_PASSWORD.sub(r"\1" + MASK + "@", value))
    return value


def shown_payload(stored: str, limit_chars: int = PAYLOAD_LIMIT_CHARS) -> tuple[str | None, bool]:
    """A payload as stored (jsonb's JSON text), redacted, as indented JSON of at most
    ``limit_chars`` characters; and whether it was truncated.

    None for a payload nested too deeply for Python to decode, redact or indent (jsonb takes
    thousands of levels; Python's json stops near its recursion limit, and the redaction and
    indentation recurse too, so from a few hundred levels on): nothing of it is shown, since
    it cannot be redacted.
    """
    try:
        value = json.loads(stored)
        text = json.dumps(redact_payload(value), indent=2, ensure_ascii=False, sort_keys=True)
    except RecursionError:
        return None, False
    if len(text) <= limit_chars:
        return text, False
    return text[:limit_chars], True


def duration(seconds: float | None) -> str:
    """``42s``, ``3m 05s``, ``2h 10m``, ``3d 4h``; an empty string for None."""
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def eta(seconds: float | None, finished: bool, status: str | None = None) -> str:
    """The time left as a page shows it; a paused job has none (nothing of it moves)."""
    if finished:
        return "done"
    if status == "paused":
        return "paused"
    if seconds is None:
        return "unknown"
    return duration(seconds)


def rate(chunks_per_second: float | None) -> str:
    if chunks_per_second is None:
        return ""
    value = float(chunks_per_second)
    if value >= 100:
        return f"{value:,.0f}/s"
    if value >= 1:
        return f"{value:.1f}/s"
    return f"{value * 60:.1f}/min"


def tokens(level: float | None) -> str:
    """A token bucket's level, one decimal (``6.2``); whole tokens are chunks that may start
    now."""
    return "" if level is None else f"{float(level):.1f}"


def timestamp(at: datetime | str | None) -> str:
    """UTC, to the second: ``2024-05-01 12:00:03``."""
    if at is None:
        return ""
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at.strftime("%Y-%m-%d %H:%M:%S")
