"""What may be shown of a DSN: the password never reaches a log line or an error message."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_dsn", "scrub_password"]


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.scheme and parts.netloc and "@" in parts.netloc:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostinfo}" if ":" in userinfo else parts.netloc)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    redacted = urlunsplit(parts._replace(query=query))
    if not parts.scheme:  # key=value form: password=... anywhere
        redacted = re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    return redacted


def scrub_password(text: str, dsn: str) -> str:
    """``text`` with the DSN's password (if it has one) replaced: asyncpg messages can echo
    parts of the DSN."""
    with contextlib.suppress(ValueError):
        password = urlsplit(dsn).password
        if password:
            text = text.replace(password, "***")
    return text
