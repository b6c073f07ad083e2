"""How chunkd's connections encode and decode jsonb.

jsonb in: text the caller serialised already (the worker serialises results itself, so a bad
value fails that chunk alone); jsonb out: decoded Python values, except where statements read it
as text on purpose (claims read payloads as text, so numbers stay exact).
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from chunkd.chunk import too_deep

__all__ = ["UndecodableValueError", "set_jsonb_codec"]


class UndecodableValueError(asyncpg.exceptions.DataError):
    """A value the database returned that Python cannot decode: a jsonb value nested deeper
    than Python's recursion limit (jsonb takes thousands of levels, Python's json about
    1,000). A data exception (SQLSTATE 22000), as if the server had raised it, so every caller
    that reports database errors (a daemon task, the CLI, the dashboard) says it in one line
    instead of meeting a RecursionError; the connection stays usable. Statements that may
    return such a value read it as text and decode it where the failure has a meaning (the
    claim: :class:`chunkd.Chunk`; the dashboard's payload views)."""


def _decode_jsonb(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise UndecodableValueError(
            f"chunkd: the database returned {too_deep('a jsonb value')}"
        ) from None


async def set_jsonb_codec(conn: asyncpg.Connection) -> None:
    """Installs the codec on a new connection."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=lambda text: text, decoder=_decode_jsonb
    )
