"""Assertions on what was enqueued, and the results of a job's chunks, read on the test's own
connection (an asyncpg ``Connection`` or ``Pool``, a psycopg ``AsyncConnection``) or a DSN."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chunkd.app.payloads import as_json_values
from chunkd.chunk import dumps_json, loads_json
from chunkd.client import fetch_statement
from chunkd.client.common import job_id

__all__ = ["Enqueued", "assert_enqueued", "refute_enqueued", "results"]

SHOWN = 10


@dataclass(frozen=True)
class Enqueued:
    """One job as enqueued: its id, kind, payload and chunk payloads (decoded JSON)."""

    id: UUID
    kind: str
    payload: Any
    chunks: list[Any]


@asynccontextmanager
async def _connection(conn: Any) -> AsyncIterator[Any]:
    if not isinstance(conn, str):
        yield conn
        return
    from chunkd.db import connect

    own = await connect(conn)
    try:
        yield own
    finally:
        await own.close()


def _pattern(value: Any) -> str | None:
    """A partial match as jsonb text: a mapping, a list, a dataclass or pydantic model (its
    fields as stored), or any JSON value."""
    if value is None:
        return None
    return dumps_json(as_json_values(value), ensure_ascii=False)


async def _jobs(conn: Any, kind: str | None, payload: Any, chunk: Any) -> list[Enqueued]:
    async with _connection(conn) as c:
        rows = await fetch_statement(
            c, "testing_enqueued", (kind, _pattern(payload), _pattern(chunk))
        )
    return [
        Enqueued(UUID(str(r[0])), r[1], loads_json(r[2]), loads_json(r[3] or "[]")) for r in rows
    ]


def _listing(jobs: list[Enqueued]) -> str:
    if not jobs:
        return "no job at all"
    lines = [f"  {j.kind} payload={j.payload!r} chunks={j.chunks!r}" for j in jobs[-SHOWN:]]
    more = f" (the last {SHOWN})" if len(jobs) > SHOWN else ""
    return f"{len(jobs)} job(s){more}:\n" + "\n".join(lines)


def _wanted(kind: str | None, payload: Any, chunk: Any) -> str:
    parts = [f"kind={kind!r}"] if kind is not None else []
    if payload is not None:
        parts.append(f"payload containing {_pattern(payload)}")
    if chunk is not None:
        parts.append(f"a chunk containing {_pattern(chunk)}")
    return "a job" + (" with " + ", ".join(parts) if parts else "")


async def assert_enqueued(
    conn: Any,
    *,
    kind: str | None = None,
    payload: Any = None,
    chunk: Any = None,
    count: int | None = None,
) -> list[Enqueued]:
    """Asserts that jobs matching every given filter were enqueued (whatever their state since);
    returns them, oldest first.

    Args:
        conn: an asyncpg ``Connection`` or ``Pool``, a psycopg ``AsyncConnection`` (inside the
            test's transaction, it sees what the transaction enqueued), or a DSN.
        kind: the job's kind.
        payload: a partial match of the job's payload, as PostgreSQL's jsonb ``@>`` tests it:
            ``{"mailbox": "ada"}`` matches ``{"mailbox": "ada", "folder": "INBOX"}``; an array
            matches one holding at least those elements. A dataclass or pydantic model
            matches as its stored JSON.
        chunk: a partial match of at least one of the job's chunk payloads, likewise.
        count: how many jobs must match; None: at least one.

    Raises:
        AssertionError: no match (or not ``count``); the message lists what was enqueued.
    """
    found = await _jobs(conn, kind, payload, chunk)
    if (count is None and found) or (count is not None and len(found) == count):
        return found
    every = await _jobs(conn, None, None, None)
    expected = _wanted(kind, payload, chunk)
    amount = f"{count} time(s), found {len(found)}" if count is not None else "none found"
    raise AssertionError(f"expected {expected} enqueued: {amount}; enqueued: {_listing(every)}")


async def refute_enqueued(
    conn: Any, *, kind: str | None = None, payload: Any = None, chunk: Any = None
) -> None:
    """Asserts that no job matching every given filter was enqueued (filters as
    :func:`assert_enqueued`).

    Raises:
        AssertionError: some did; the message lists them.
    """
    found = await _jobs(conn, kind, payload, chunk)
    if found:
        expected = _wanted(kind, payload, chunk)
        raise AssertionError(f"expected no {expected.removeprefix('a ')}: {_listing(found)}")


async def results(conn: Any, job: UUID | str) -> list[Any]:
    """The results of the job's chunks in ``seq`` order (decoded JSON, numbers exact); None
    for a chunk that did not complete (or completed with no result).

    Raises:
        chunkd.InvalidInputError: ``job`` is not a job id.
    """
    async with _connection(conn) as c:
        rows = await fetch_statement(c, "testing_results", (job_id(job),))
    return [None if r[2] is None else loads_json(r[2]) for r in rows]
