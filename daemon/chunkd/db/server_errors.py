"""Server refusals as one line a user can act on: what is missing, and the GRANT that fixes it.

Used by the operator commands (:mod:`chunkd.ops.errors`), the start-up checks
(:mod:`chunkd.db.migrate`) and, for anything else, the CLI's entry point.
"""

from __future__ import annotations

import re

import asyncpg

__all__ = ["describe_server_error", "quote_role", "read_only_message"]

_PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_$]*$")
_SCHEMA_MISSING = {"3F000", "42P01", "42883"}  # invalid schema, undefined table / function
_PERMISSION_DENIED = re.compile(
    r"^permission denied for (schema|function|procedure|table|view|sequence|database) (.+)$"
)


def quote_role(name: str) -> str:
    """``name`` as an SQL identifier, for GRANT lines a user copies (quoted when needed)."""
    if _PLAIN_IDENTIFIER.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def read_only_message(*, in_recovery: bool | None) -> str:
    if in_recovery:
        return (
            "the database is a read-only standby (in recovery): point the DSN at the primary; "
            "nothing was written"
        )
    return (
        "the database is read-only (default_transaction_read_only is on for this server, "
        "database or role, or this is a standby): chunkd needs a writable primary; "
        "nothing was written"
    )


def describe_server_error(exc: asyncpg.PostgresError, *, role: str | None = None) -> str:
    """One line for a server error: chunkd's own messages as written (without their
    ``chunkd: `` prefix), refusals with what is missing and how to grant it, anything else by
    its first line. ``role``: the connected role, named in GRANT lines when known."""
    message = (str(exc) or type(exc).__name__).splitlines()[0]
    if message.startswith("chunkd: "):
        return message.removeprefix("chunkd: ")
    sqlstate = getattr(exc, "sqlstate", None)
    who = quote_role(role) if role else "<role>"
    named = f"role {role}" if role else "this role"
    if sqlstate == "25006":  # read_only_sql_transaction
        return read_only_message(in_recovery=None)
    if sqlstate == "42501":  # insufficient_privilege
        denied = _PERMISSION_DENIED.match(message)
        if denied is None:
            return f"permission denied: {message}"
        kind, name = denied[1], denied[2]
        if kind == "schema":
            return (
                f"{named} has no USAGE on schema {name}: "
                f"GRANT USAGE ON SCHEMA {name} TO {who}; (as the schema's owner)"
            )
        if kind in ("function", "procedure"):
            return (
                f"{named} may not execute chunkd.{name}: ask the schema's owner for "
                f"GRANT EXECUTE ON FUNCTION chunkd.{name}(...) TO {who}; "
                "(docs/security.md lists the grants of each role)"
            )
        if kind == "database":
            return (
                f"{named} may not create schemas in database {name}: "
                f"GRANT CREATE ON DATABASE {quote_role(name)} TO {who};"
            )
        return (
            f"{named} may not read or change {kind} chunkd.{name}: run this command as the "
            "schema's owner (docs/security.md)"
        )
    if sqlstate in _SCHEMA_MISSING:
        return f"the chunkd schema is missing or incomplete ({message}); run `chunkd migrate`"
    return f"database error: {message}"
