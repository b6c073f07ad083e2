"""What keeps VACUUM from cleaning the queue: the oldest xmin holder, and sessions left idle in
a transaction (with the chunkd locks they hold and the sessions they block).

A queue deletes and updates rows all day; every row deleted after the oldest snapshot still
open (or the oldest replication slot, or prepared transaction) must be kept, so one forgotten
``BEGIN`` makes the queue tables grow and each claim scan more dead rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chunkd.db.server_errors import quote_role
from chunkd.db.sql_files import queries
from chunkd.ops.doctor.findings import Finding, Level, human_duration, quote_literal

if TYPE_CHECKING:
    import asyncpg

    from chunkd.ops.doctor.context import Context

__all__ = ["idle_in_transaction", "xmin_horizon"]

HOLDERS = 10  # how many of the oldest holders are looked at (and listed in --json)
_READ_ALL_STATS = "GRANT pg_read_all_stats TO {role}; shows them"


def _holder_level(row: asyncpg.Record, ctx: Context) -> Level:
    if row["holder"] == "replication slot":
        return Level.OK if row["active"] else Level.PROBLEM
    return ctx.options.age_level(row["age_s"])


def _describe(row: asyncpg.Record) -> str:
    xid_age = f"xid age {row['xid_age']}"
    if row["holder"] == "replication slot":
        state = "active" if row["active"] else "inactive"
        return f"{state} replication slot {row['name']} ({row['state']}, {xid_age})"
    if row["holder"] == "prepared transaction":
        return (
            f"prepared transaction {quote_literal(row['name'])} of role {row['role']}, "
            f"prepared {human_duration(row['age_s'])} ago ({xid_age})"
        )
    who = f"session pid {row['pid']} of role {row['role'] or '?'}"
    if row["application"]:
        who += f", application {row['application']!r}"
    if not row["visible"]:
        return f"{who} ({xid_age}; its start is hidden from this role)"
    if row["age_s"] is None:
        return f"{who} ({row['state'] or 'no transaction'}, {xid_age})"
    return (
        f"{who} ({row['state']}), in its transaction for {human_duration(row['age_s'])} ({xid_age})"
    )


def _advice(row: asyncpg.Record) -> str:
    if row["holder"] == "replication slot":
        return (
            "if its consumer is gone for good: "
            f"SELECT pg_drop_replication_slot({quote_literal(row['name'])});"
        )
    if row["holder"] == "prepared transaction":
        gid = quote_literal(row["name"])
        return f"finish it: COMMIT PREPARED {gid}; or ROLLBACK PREPARED {gid};"
    return (
        "until it ends VACUUM keeps every row deleted since, and the queue tables grow: end "
        f"the transaction in its client, or SELECT pg_terminate_backend({row['pid']});"
    )


async def xmin_horizon(ctx: Context) -> Finding:
    """The oldest holder of this database's xmin horizon (session, replication slot or
    prepared transaction) and its age: a warning or problem by ``--warn-age`` and
    ``--problem-age``; an inactive slot is a problem whatever its age."""
    rows = await ctx.conn.fetch(queries()["doctor_xmin_holders"], HOLDERS)
    details: dict[str, Any] = {"holders": [dict(r) for r in rows]}
    if not rows:
        return Finding(
            "xmin-horizon", Level.OK, "no snapshot or transaction is open", details=details
        )
    levels = [_holder_level(r, ctx) for r in rows]
    worst = max(range(len(rows)), key=lambda i: (levels[i].code, -i))
    row, level = rows[worst], levels[worst]
    if level is not Level.OK:
        return Finding(
            "xmin-horizon",
            level,
            f"the xmin horizon is held by {_describe(row)}",
            _advice(row),
            details=details,
        )
    hidden = [r for r in rows if r["holder"] == "session" and not r["visible"]]
    if hidden:
        return Finding(
            "xmin-horizon",
            Level.WARNING,
            f"the oldest holder is {_describe(rows[0])}; {len(hidden)} holder(s) hide their "
            f"age from role {ctx.role}",
            _READ_ALL_STATS.format(role=quote_role(ctx.role)),
            details=details,
        )
    return Finding(
        "xmin-horizon",
        Level.OK,
        f"the oldest holder is {_describe(rows[0])}, within --warn-age "
        f"{human_duration(ctx.options.warn_age_s)}",
        details=details,
    )


def _session(row: asyncpg.Record) -> str:
    text = f"pid {row['pid']} of role {row['role']}"
    if row["application"]:
        text += f" ({row['application']!r})"
    text += f" idle in transaction for {human_duration(row['idle_s'])}"
    if row["chunkd_locks"]:
        text += f", holding {', '.join(row['chunkd_locks'])}"
    if row["blocking"]:
        text += f", blocking pid(s) {', '.join(map(str, row['blocking']))}"
    return text


def _idle_advice(row: asyncpg.Record) -> str:
    # Text for the operator to read (and copy), never executed here.
    end = f"SELECT pg_terminate_backend({row['pid']});"
    timeout = f"ALTER ROLE {quote_role(row['role'])} SET idle_in_transaction_session_timeout"
    return (
        f"commit or roll back in that client, or {end} {timeout} = '1min'; "
        "ends such sessions from now on"
    )


async def idle_in_transaction(ctx: Context) -> Finding:
    """Sessions idle inside a transaction for longer than ``--warn-age``: a warning; a problem
    when one holds a lock on a chunkd table, blocks another session, or passed
    ``--problem-age``."""
    options = ctx.options
    rows = await ctx.conn.fetch(queries()["doctor_idle_in_transaction"], options.warn_age_s)
    details: dict[str, Any] = {"sessions": [dict(r) for r in rows]}
    hidden = ctx.hidden_note()
    if not rows:
        bound = f"no session idle in transaction for more than {human_duration(options.warn_age_s)}"
        if hidden:
            return Finding(
                "idle-in-transaction",
                Level.WARNING,
                f"{bound} that role {ctx.role} can see; {hidden}",
                _READ_ALL_STATS.format(role=quote_role(ctx.role)),
                details=details,
            )
        return Finding("idle-in-transaction", Level.OK, bound, details=details)

    def level(row: asyncpg.Record) -> Level:
        if row["chunkd_locks"] or row["blocking"]:
            return Level.PROBLEM
        return options.age_level(row["idle_s"])

    worst = max(rows, key=lambda r: (level(r).code, r["idle_s"]))
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return Finding(
        "idle-in-transaction",
        level(worst),
        f"{_session(worst)}{more}",
        _idle_advice(worst),
        details=details,
    )
