"""A rolling upgrade: refusing a migration step that drops what running daemons of another
chunkd release call.

After each step (a versioned migration, or the definitions transaction), inside its
transaction, :func:`refuse_drops` compares the schema's functions and views with those before
it. When the step dropped one, and daemons of another chunkd version heartbeat in the workers
registry, it raises, which rolls the step back: a daemon of a release that
:data:`chunkd.db.released.DAEMON_CALLS` lists stops only the drops of what that release's
daemon names; one of a version missing there stops every drop. A function whose successor of
the same name exists after the step (``-- carry grants:``, a trailing argument with a default)
is no drop: every call of the old one finds the new one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from chunkd.db.definitions import schema_objects
from chunkd.db.released import DAEMON_CALLS
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.version import __version__

if TYPE_CHECKING:
    import asyncpg

__all__ = ["LIVE_WORKER_S", "refuse_drops"]

#: A registered daemon that does not say how often it heartbeats (0.1, 0.2: ``heartbeat_s``
#: NULL) is taken to be running while its last heartbeat is younger than this; one that does,
#: while it has not missed three (the reaper's rule).
LIVE_WORKER_S = 300.0

_NAME = re.compile(r"^chunkd\.([a-z_][a-z0-9_]*)")


def _name(obj: str) -> str:
    """``chunkd.f(text,integer)`` or ``chunkd.v`` -> ``f`` or ``v``."""
    found = _NAME.match(obj)
    return found[1] if found else obj


async def refuse_drops(
    conn: asyncpg.Connection,
    before: set[tuple[str, str]],
    step: str,
    *,
    successors: dict[str, str] | None = None,
) -> None:
    """Raises :class:`~chunkd.errors.ChunkdError` (rolling the step back) when it dropped a
    function or view (of ``before``: :func:`chunkd.db.definitions.schema_objects` at its start)
    that running daemons of another chunkd version call. ``successors``: old function -> the
    new one of its name that takes every call of it (not counted when it exists after)."""
    after = {obj for _, obj in await schema_objects(conn)}
    new = successors or {}
    dropped = sorted(o for _, o in before if o not in after and new.get(o) not in after)
    if not dropped:
        return
    live = await conn.fetch(queries()["live_workers_of_other_versions"], __version__, LIVE_WORKER_S)
    in_the_way: dict[str, list[str]] = {}  # version -> its workers whose daemon calls a drop
    called: set[str] = set()
    for row in live:
        calls = DAEMON_CALLS.get(row["version"])
        hit = [o for o in dropped if calls is None or _name(o) in calls]
        if hit:
            in_the_way.setdefault(row["version"], []).append(row["worker_id"])
            called.update(hit)
    if not in_the_way:
        return
    first, *more = sorted(called)
    unknown = [v for v in in_the_way if v not in DAEMON_CALLS]
    versions = ", ".join(sorted(in_the_way))
    if unknown:
        whose = f"{versions} (a version this chunkd has no list of calls for) may call"
    else:
        whose = f"{versions} call"
    workers = [w for v in sorted(in_the_way) for w in in_the_way[v]]
    shown = ", ".join(workers[:5]) + (" ..." if len(workers) > 5 else "")
    counting = _counting([r for r in live if r["worker_id"] in workers])
    raise ChunkdError(
        f"{step} drops {first}" + (f" and {len(more)} more" if more else "")
        + f", which running daemons of chunkd {whose}: stop them first ({shown}), "
        f"then run chunkd migrate again ({counting}); nothing of it was applied"
    )  # fmt: skip


def _counting(rows: list[asyncpg.Record]) -> str:
    """How long the last of ``rows`` (live workers) keeps counting as running, and by what."""
    last = max(rows, key=lambda r: r["left_s"])
    if last["heartbeat_s"] is None:
        rule = f"until {LIVE_WORKER_S / 60:g} minutes after its last heartbeat"
    else:
        rule = f"until it has missed three heartbeats of {last['heartbeat_s']:g} s"
    left_s = max(1, round(last["left_s"]))
    return f"a daemon killed without stopping counts as running for {left_s} s more: {rule}"
