"""What may be shown of a DSN: the password never reaches a log line or an error message."""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from chunkd.dsn import is_uri, parse_conninfo, to_uri

__all__ = ["redact_dsn", "scrub_password"]

# A key=value DSN's password: quoted (backslash escapes inside, possibly unterminated) or not.
_QUERY_PASSWORD = re.compile(r"(?i)(?:^|&)password=([^&]*)")
_KEY_VALUE_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)+)")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, for logs and error messages: in a URI's
    user information or ``password=`` query parameter, or a key=value DSN's ``password``."""
    if not is_uri(dsn):  # key=value form: password=... anywhere
        try:
            parse_conninfo(dsn)
        except ValueError:  # a mistyped URI ("postgresql:/u:pw@h") may hold a password
            return "<unparseable DSN>"
        return _KEY_VALUE_PASSWORD.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.netloc and "@" in parts.netloc:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostinfo}" if ":" in userinfo else parts.netloc)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(query=query))


def _passwords(dsn: str) -> set[str]:
    """Every form the DSN's password may take in a message: as written and percent-decoded."""
    try:
        parts = urlsplit(to_uri(dsn))
        found = [parts.password or "", *_QUERY_PASSWORD.findall(parts.query)]
    except ValueError:
        return set()
    return {form for p in found if p for form in (p, unquote(p), unquote_plus(p))}


def scrub_password(text: str, dsn: str) -> str:
    """``text`` with the DSN's password (if it has one, in any of the DSN's forms) replaced:
    asyncpg messages can echo parts of the DSN."""
    for password in sorted(_passwords(dsn), key=len, reverse=True):
        text = text.replace(password, "***")
    return text
