"""PostgreSQL connection strings in either of libpq's forms: a URI
(``postgresql://user@host/db``) or key=value pairs (``host=db user=chunkd dbname=app``).

asyncpg takes URIs only, so a key=value string is turned into the URI that means the same
(:func:`to_uri`) before anything connects. The grammar is libpq's ("Keyword/Value Connection
Strings", PostgreSQL manual 34.1.1): ``keyword = value`` pairs separated by whitespace, spaces
around ``=`` optional, a value in single quotes when it is empty or holds spaces, ``\\'`` and
``\\\\`` escaping inside or outside quotes. Written here rather than taken from psycopg (whose
``conninfo_to_dict`` calls libpq) because chunkd does not depend on psycopg or libpq.

No error message here quotes the string: it may hold a password.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode

__all__ = ["is_uri", "parse_conninfo", "to_uri", "with_dbname"]

URI_SCHEMES = ("postgresql://", "postgres://")


def is_uri(dsn: str) -> bool:
    """True for a ``postgresql://`` or ``postgres://`` URI."""
    return dsn.strip().startswith(URI_SCHEMES)


def parse_conninfo(text: str) -> dict[str, str]:
    """The key=value pairs of a libpq connection string, in order (a repeated key: the last).

    Raises:
        ValueError: not key=value pairs (a key without ``=``, an unterminated quote); the
            message names the problem and the position, never the value.
    """
    pairs: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and not text[i].isspace() and text[i] != "=":
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i == n or text[i] != "=":
            raise ValueError(
                f"the DSN is neither a postgresql:// URI nor key=value pairs "
                f"(no '=' after the word at character {start + 1})"
            )
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value, i = _value(text, i, key)
        pairs[key] = value


def _value(text: str, i: int, key: str) -> tuple[str, int]:
    """The value starting at ``text[i]`` and the index after it."""
    chars: list[str] = []
    quoted = i < len(text) and text[i] == "'"
    if quoted:
        i += 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if (quoted and char == "'") or (not quoted and char.isspace()):
            return "".join(chars), i + 1 if quoted else i
        chars.append(char)
        i += 1
    if quoted:
        raise ValueError(f"the DSN's value of {key} has an opening quote but no closing one")
    return "".join(chars), i


def _host_part(host: str, port: str | None) -> str:
    shown = f"[{host}]" if ":" in host else quote(host, safe=".-_~")
    return shown if port is None else f"{shown}:{port}"


def to_uri(dsn: str) -> str:
    """``dsn`` as a ``postgresql://`` URI: a URI unchanged, key=value pairs converted.

    ``user`` and ``password`` become the URI's user information, a single network ``host``
    (and its ``port``) its host, ``dbname`` its path; every other key (a unix socket
    directory or several hosts as ``host``, ``sslmode``, ``application_name``, ...) a query
    parameter, which asyncpg reads the way libpq does. An empty string is returned as is
    (libpq's defaults and the ``PG*`` environment variables apply).

    Raises:
        ValueError: neither a URI nor key=value pairs (the message never holds the DSN).
    """
    if not dsn.strip() or is_uri(dsn):
        return dsn
    pairs = parse_conninfo(dsn)
    user, password = pairs.pop("user", None), pairs.pop("password", None)
    host, port = pairs.get("host"), pairs.get("port")
    netloc = ""
    if host and not host.startswith("/") and "," not in host and (port is None or port.isdigit()):
        netloc = _host_part(pairs.pop("host"), pairs.pop("port", None))
    if user is not None or password is not None:
        userinfo = quote(user or "", safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        netloc = f"{userinfo}@{netloc}"
    dbname = pairs.pop("dbname", None)
    path = "" if dbname is None else "/" + quote(dbname, safe="")
    query = f"?{urlencode(pairs)}" if pairs else ""
    return f"postgresql://{netloc}{path}{query}"


def with_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` (either form) as a ``postgresql://`` URI naming database ``dbname`` instead:
    the same server, role and options, the path replaced and any ``dbname``/``database``
    query parameter dropped (a unix socket URI, ``postgresql://user@/db?host=/run/pg``, keeps
    its empty host).

    Raises:
        ValueError: neither a URI nor key=value pairs (the message never holds the DSN).
    """
    uri = to_uri(dsn) or "postgresql://"
    scheme, _, rest = uri.strip().partition("://")
    rest, _, query = rest.partition("?")
    netloc = rest.partition("/")[0]
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
            if k not in ("dbname", "database")]  # fmt: skip
    tail = f"?{urlencode(kept)}" if kept else ""
    return f"{scheme}://{netloc}/{quote(dbname, safe='')}{tail}"
