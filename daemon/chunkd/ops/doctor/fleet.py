"""The workers registry: daemons that stopped heartbeating, and daemons of other versions."""

from __future__ import annotations

from chunkd.db.server_errors import quote_role
from chunkd.db.sql_files import queries
from chunkd.ops.doctor.context import Context
from chunkd.ops.doctor.findings import Finding, Level, human_duration, not_checked, quote_literal
from chunkd.ops.workers import list_workers
from chunkd.version import __version__

__all__ = ["workers"]


def _dead_advice(worker_id: str) -> str:
    # Text for the operator to read (and copy), never executed here.
    remove = f"DELETE FROM chunkd.workers WHERE worker_id = {quote_literal(worker_id)};"  # noqa: S608
    return (
        "killed or frozen: the reaper returns its chunks after three missed heartbeats (or its "
        "leases, for a daemon of 0.2), and removes its row after 15 minutes of silence once it "
        f"holds nothing (a running daemon's reaper does); restart it if frozen; to remove the "
        f"row at once, as the schema's owner: {remove}"
    )


async def workers(ctx: Context) -> Finding:
    """Live and dead workers (silent for ``--stale-after``, by default for three of the
    heartbeats each one's row says it sends); live ones of another version than this chunkd.
    No live worker at all is a warning: nothing claims chunks."""
    stale_after_s = ctx.options.stale_after_s
    found = await ctx.conn.fetch(queries()["doctor_privileges"], [], ["workers"])
    if not found:
        return not_checked("workers", "no chunkd schema in this database", "run chunkd migrate")
    if not found[0]["granted"]:
        return not_checked(
            "workers",
            f"role {ctx.role} may not read chunkd.workers",
            "run chunkd doctor as the schema's owner, or GRANT SELECT ON chunkd.workers TO "
            f"{quote_role(ctx.role)};",
        )
    rows = await list_workers(ctx.conn, stale_after_s=stale_after_s)
    live = [w for w in rows if w.live]
    dead = [w for w in rows if not w.live]
    others = sorted({w.version for w in live if w.version != __version__})
    details = {
        "live": [w.worker_id for w in live],
        "dead": [w.worker_id for w in dead],
        "versions": sorted({w.version for w in live}),
        "stale_after_s": {w.worker_id: w.stale_after_s for w in rows},
    }
    if others:
        odd = [w for w in live if w.version != __version__]
        return Finding(
            "workers",
            Level.WARNING,
            f"{len(odd)} of {len(live)} live daemon(s) run chunkd {', '.join(others)}, this host "
            f"{__version__} (e.g. {odd[0].worker_id})",
            "finish the rolling upgrade (or roll this host back): one version everywhere",
            details=details,
        )
    if dead:
        oldest = max(dead, key=lambda w: w.heartbeat_age_s)
        age = human_duration(oldest.heartbeat_age_s)
        if stale_after_s is not None:
            bound, example = human_duration(stale_after_s), oldest.worker_id
        elif oldest.heartbeat_s is not None:  # the reaper's rule
            bound = "three of their heartbeats"
            example = f"{oldest.worker_id}, heartbeat every {oldest.heartbeat_s:g}s"
        else:  # a daemon of 0.2
            bound = human_duration(oldest.stale_after_s)
            example = f"{oldest.worker_id}, which does not say how often it heartbeats"
        return Finding(
            "workers",
            Level.WARNING,
            f"{len(dead)} registered daemon(s) silent for more than {bound} (e.g. {example}, "
            f"last heartbeat {age} ago); {len(live)} live",
            _dead_advice(oldest.worker_id),
            details=details,
        )
    if not live:
        return Finding(
            "workers",
            Level.WARNING,
            "no chunkd run is registered: nothing claims chunks from this database",
            "start chunkd run (docs/systemd.md)",
            details=details,
        )
    return Finding(
        "workers",
        Level.OK,
        f"{len(live)} live daemon(s), all chunkd {__version__}",
        details=details,
    )
