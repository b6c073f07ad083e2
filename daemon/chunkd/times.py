"""The times chunkd stores: from 0001-01-01 to before 10000-01-01 UTC, what Python's
:class:`~datetime.datetime` holds.

asyncpg reads a ``timestamptz`` as an aware datetime in UTC, so a time PostgreSQL accepts
beyond that range (``'10000-01-01'``, ``'infinity'``) could not be read back by the daemon, the
CLI, the dashboard or the client; every timestamp column of schema ``chunkd`` refuses one
(``chunkd.is_storable_time``). The same range is checked here before a time is sent, so a bad
one is one line where it is given. An aware datetime within Python's range can still lie
outside it in UTC (``9999-12-31T23:00-05:00`` is 10000-01-01 04:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["RANGE", "local_text", "storable"]

#: The range as the one-line refusals say it.
RANGE = "from 0001-01-01 to 9999-12-31 UTC"


def storable(at: datetime) -> bool:
    """Whether the aware datetime ``at`` is a time chunkd stores (its UTC time fits)."""
    try:
        at.astimezone(UTC)
    except OverflowError:
        return False
    return True


def local_text(at: datetime) -> str:
    """``at`` in this host's time zone to the second (``2026-12-01 09:00:00``), or in UTC with
    the zone named when the local time would leave Python's range (the first or last hours
    chunkd stores)."""
    try:
        return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except OverflowError:
        return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
