"""Dead rows and the last autovacuum of each chunkd table.

Autovacuum starts on a table once its dead rows pass ``autovacuum_vacuum_threshold +
autovacuum_vacuum_scale_factor * rows`` (the table's own settings, or the server's). Dead
rows far past that mean autovacuum is not keeping up: something holds the xmin horizon
back, or it is off, or too slow for the queue's churn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chunkd.db.sql_files import queries
from chunkd.ops.doctor.findings import Finding, Level, human_duration

if TYPE_CHECKING:
    import asyncpg

    from chunkd.ops.doctor.context import Context

__all__ = ["dead_tuples"]

# Dead rows past WARN_FACTOR times autovacuum's start (and at least WARN_MIN of them) are a
# warning; past PROBLEM_FACTOR times (and PROBLEM_MIN) a problem. The minimums keep small
# tables, where a few hundred dead rows cost nothing, quiet.
WARN_FACTOR, WARN_MIN = 2.0, 1_000
PROBLEM_FACTOR, PROBLEM_MIN = 10.0, 10_000


def _level(row: asyncpg.Record) -> Level:
    dead, start = row["dead"], row["autovacuum_at"]
    if dead >= PROBLEM_MIN and dead > PROBLEM_FACTOR * start:
        return Level.PROBLEM
    if dead >= WARN_MIN and (dead > WARN_FACTOR * start or not row["autovacuum"]):
        return Level.WARNING
    return Level.OK


def _last_vacuum(row: asyncpg.Record) -> str:
    if not row["autovacuum"]:
        return "autovacuum is off for it"
    ago = row["autovacuum_s_ago"]
    return "never autovacuumed" if ago is None else f"last autovacuum {human_duration(ago)} ago"


def _describe(row: asyncpg.Record) -> str:
    return (
        f"chunkd.{row['name']} has {row['dead']} dead row(s) beside {row['live']} live "
        f"(autovacuum starts at {row['autovacuum_at']:.0f}), {_last_vacuum(row)}"
    )


async def dead_tuples(ctx: Context) -> Finding:
    """The chunkd table with the most dead rows for its size, measured against the point
    where autovacuum starts on it."""
    rows = await ctx.conn.fetch(queries()["doctor_tables"])
    details: dict[str, Any] = {"tables": [dict(r) for r in rows]}
    if not rows:
        return Finding(
            "dead-tuples",
            Level.WARNING,
            "not checked: no chunkd tables in this database",
            "run chunkd migrate",
            checked=False,
            details=details,
        )
    worst = max(rows, key=lambda r: (_level(r).code, r["dead"] / max(r["autovacuum_at"], 1.0)))
    level = _level(worst)
    if level is Level.OK:
        most = f"most dead rows: {_describe(rows[0])}" if rows[0]["dead"] else "no dead rows"
        return Finding(
            "dead-tuples",
            Level.OK,
            f"{len(rows)} chunkd tables within autovacuum's reach; {most}",
            details=details,
        )
    advice = (
        f"turn it back on: ALTER TABLE chunkd.{worst['name']} RESET (autovacuum_enabled);"
        if not worst["autovacuum"]
        else "autovacuum is behind: look for an old xmin holder (xmin-horizon above), "
        f"then VACUUM (VERBOSE) chunkd.{worst['name']}; as its owner"
    )
    return Finding("dead-tuples", level, _describe(worst), advice, details=details)
