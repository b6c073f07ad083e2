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

#: A registered daemon whose last heartbeat is younger than this is taken to be running (it
#: heartbeats every lease/3: 20 s at the default lease) when a migration would drop a function.
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
    raise ChunkdError(
        f"{step} drops {first}" + (f" and {len(more)} more" if more else "")
        + f", which running daemons of chunkd {whose}: stop them first ({shown}), "
        "then run chunkd migrate again; nothing of it was applied"
    )  # fmt: skip
