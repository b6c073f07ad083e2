"""The schema against this chunkd, and the role's privileges against what each use needs.

What each use needs is read from the statements chunkd ships, so it cannot drift from them:
``chunkd run`` the functions of ``sql/queries.sql``'s daemon blocks
(:func:`chunkd.db.migrate.daemon_functions`); enqueueing the functions of the client's and
``chunkd enqueue``'s blocks; flow control (``chunkd pause``, ``resume``, ``limit``) those
of its blocks; ``chunkd web`` the functions it calls and the views it reads in
``sql/web.sql`` (its actions apart). docs/security.md lists the same grants by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from chunkd.db.connection import DatabaseError
from chunkd.db.definitions import catalog_state
from chunkd.db.migrate import daemon_functions, schema_state
from chunkd.db.server_errors import describe_server_error, quote_role
from chunkd.db.sql_files import definitions, queries
from chunkd.errors import ChunkdError
from chunkd.ops.doctor.context import Context
from chunkd.ops.doctor.findings import Finding, Level, not_checked
from chunkd.version import __version__

__all__ = ["Needs", "definitions_changed_by_hand", "privileges", "role_needs", "schema_version"]

_ENQUEUE_BLOCKS = ("client_create_sync_job", "client_create_sync_jobs", "ops_create_job")
_FLOW_BLOCKS = (
    "ops_pause_sync_job",
    "ops_resume_sync_job",
    "ops_pause_kind",
    "ops_resume_kind",
    "ops_set_rate_limit",
    "ops_set_concurrency_limit",
    "ops_flow_limits",
)
_WEB_ACTIONS = (
    "web_retry_failed_chunks",
    "web_cancel_sync_job",
    "web_pause_sync_job",
    "web_resume_sync_job",
    "web_pause_kind",
    "web_resume_kind",
)
# What tells a role the schema's versions and definitions (chunkd.db.migrate.check_version).
_SCHEMA = ("schema_definitions", "schema_versions")
_FUNCTION = re.compile(r"\bchunkd\.([a-z_][a-z0-9_]*)\s*\(")
_RELATION = re.compile(r"\bchunkd\.([a-z_][a-z0-9_]*)\b(?!\s*\()")


@dataclass(frozen=True)
class Needs:
    """What one use of a role needs: EXECUTE on ``functions``, SELECT on ``relations``."""

    functions: tuple[str, ...]
    relations: tuple[str, ...] = ()


def _scan(blocks: list[str]) -> Needs:
    code = [re.sub(r"--[^\n]*", "", sql) for sql in blocks]
    return Needs(
        functions=tuple(sorted({f for sql in code for f in _FUNCTION.findall(sql)})),
        relations=tuple(sorted({r for sql in code for r in _RELATION.findall(sql)})),
    )


def _keys(need: Needs) -> list[tuple[str, str]]:
    return [("function", f) for f in need.functions] + [("relation", r) for r in need.relations]


@cache
def role_needs() -> dict[str, Needs]:
    """Each use (``run``, ``enqueue``, ``client``, ``flow``, ``web``, ``web actions``,
    ``doctor``) and what it needs."""
    web = queries("web.sql")
    pages = _scan([sql for name, sql in web.items() if name not in _WEB_ACTIONS])
    return {
        "run": Needs(daemon_functions()),
        "enqueue": _scan([queries()[name] for name in _ENQUEUE_BLOCKS]),
        # The Python client's every call: enqueueing, and progress, cancel, retry.
        "client": _scan([sql for name, sql in queries().items() if name.startswith("client_")]),
        "flow": _scan([queries()[name] for name in _FLOW_BLOCKS]),
        # + the schema's bookkeeping: chunkd web checks the schema at start-up.
        "web": Needs(tuple(sorted({*pages.functions, *_SCHEMA})), pages.relations),
        "web actions": _scan([web[name] for name in _WEB_ACTIONS]),
        # chunkd doctor as a monitoring role: the registry, and the schema's bookkeeping.
        "doctor": Needs(_SCHEMA, ("workers",)),
    }


async def schema_version(ctx: Context) -> Finding:
    """The schema's version against this chunkd's: behind, ahead, missing or current."""
    try:
        state = await schema_state(ctx.conn)
    except ChunkdError as exc:
        return not_checked("schema", str(exc))
    details: dict[str, Any] = {"applied": list(state.applied), "known": list(state.known)}
    newest = max(state.known)
    if not state.applied:
        return Finding(
            "schema",
            Level.PROBLEM,
            f"database {ctx.who['database']} has no chunkd schema",
            "run chunkd migrate (as the role that will own it)",
            details=details,
        )
    if state.unknown:
        return Finding(
            "schema",
            Level.PROBLEM,
            f"the schema has version(s) {list(state.unknown)}, newer than this chunkd "
            f"{__version__} knows (up to {newest})",
            "upgrade chunkd on this host",
            details=details,
        )
    if state.pending:
        return Finding(
            "schema",
            Level.PROBLEM,
            f"the schema is behind this chunkd {__version__}: version {max(state.applied)} "
            f"applied, {newest} expected (missing {list(state.pending)})",
            "run chunkd migrate (as the schema's owner); chunkd run refuses to start until then",
            details=details,
        )
    return Finding("schema", Level.OK, f"version {newest}, as this chunkd expects", details=details)


async def definitions_changed_by_hand(ctx: Context) -> Finding:
    """Functions, views and triggers of schema chunkd whose definition no longer matches what
    ``chunkd migrate`` installed: the catalog's text of each definitions file
    (:func:`chunkd.db.definitions.catalog_state`) against the fingerprint recorded when it was
    applied. A file this chunkd ships differently is the schema check's business (migrate)."""
    try:
        schema = await schema_state(ctx.conn)
    except ChunkdError:
        schema = None  # the schema check says why; the definitions may still be readable
    if schema is not None and (not schema.applied or schema.pending):
        why = (
            f"the schema is behind this chunkd (version {max(schema.applied)} applied, "
            f"{max(schema.known)} expected)"
            if schema.applied
            else "no chunkd schema in this database"
        )
        return not_checked("definitions", why, "run chunkd migrate (as the schema's owner)")
    try:
        state = await catalog_state(ctx.conn, through_function=True)
    except DatabaseError as exc:
        return not_checked("definitions", describe_server_error(exc, role=ctx.role))
    details: dict[str, Any] = {
        "edited": list(state.edited),
        "missing": list(state.missing),
        "changed": list(state.changed),
    }
    if state.missing:
        return Finding(
            "definitions",
            Level.PROBLEM,
            f"objects of sql/{state.missing[0]} are missing from the database"
            + (f" (and of {len(state.missing) - 1} more files)" if len(state.missing) > 1 else ""),
            "run chunkd migrate: it creates them again from its definitions",
            details=details,
        )
    if state.edited:
        return Finding(
            "definitions",
            Level.WARNING,
            f"the definitions of sql/{state.edited[0]}"
            + (f" and {len(state.edited) - 1} more files" if len(state.edited) > 1 else "")
            + " were changed by hand since chunkd migrate applied them",
            "compare them with the shipped files (pg_get_functiondef); chunkd migrate "
            "--reapply puts the shipped ones back",
            details=details,
        )
    return Finding(
        "definitions",
        Level.OK,
        f"{len(definitions())} definition files as chunkd migrate applied them",
        details=details,
    )


def _grant(role: str, missing: list[tuple[str, str]]) -> str:
    functions = [signature for kind, signature in missing if kind == "function"]
    relations = [signature for kind, signature in missing if kind == "relation"]
    grants = []
    if functions:
        grants.append(f"GRANT EXECUTE ON FUNCTION {', '.join(functions)} TO {role};")
    if relations:
        grants.append(f"GRANT SELECT ON {', '.join(relations)} TO {role};")
    return " ".join(grants)


async def privileges(ctx: Context) -> Finding:
    """What this role can do: each use it holds every grant of, and, for a use it holds only
    some of (a missing grant), the GRANT that completes it (a problem). Grants a use shares
    with one the role holds in full do not count as holding some of it."""
    role = ctx.role
    if ctx.who["owner"] is None:
        return not_checked("privileges", "no chunkd schema in this database", "run chunkd migrate")
    if ctx.who["superuser"] or ctx.who["owner"]:
        what = "a superuser" if ctx.who["superuser"] else "the owner of schema chunkd"
        return Finding("privileges", Level.OK, f"role {role} is {what}: every command works")
    access = await ctx.conn.fetchrow(queries()["schema_access"])
    if access is None or not access["usage"]:
        return Finding(
            "privileges",
            Level.PROBLEM,
            f"role {role} has no USAGE on schema chunkd: no chunkd command works for it",
            f"GRANT USAGE ON SCHEMA chunkd TO {quote_role(role)}; and the grants of its use "
            "(docs/security.md)",
        )
    needs = role_needs()
    functions = sorted({f for n in needs.values() for f in n.functions})
    relations = sorted({r for n in needs.values() for r in n.relations})
    rows = await ctx.conn.fetch(queries()["doctor_privileges"], functions, relations)
    granted: dict[tuple[str, str], bool] = {}
    signatures: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for r in rows:
        key = (r["kind"], r["name"])
        granted[key] = granted.get(key, True) and r["granted"]
        if not r["granted"]:
            signatures.setdefault(key, []).append((r["kind"], r["signature"]))
    keys = {
        use: [k for k in _keys(need) if k in granted]  # absent ones: an older schema
        for use, need in needs.items()
    }
    uses = [use for use in needs if keys[use]]  # a use this schema has nothing of: skipped
    full = [use for use in uses if all(granted[k] for k in keys[use])]
    covered = {k for use in full for k in keys[use]}
    partial: dict[str, list[tuple[str, str]]] = {}
    none = []
    for use in uses:
        if use in full:
            continue
        # Grants shared with a use the role holds in full (queue_depth() is both the
        # daemon's and the dashboard's) say nothing about whether it is meant for this one.
        own = [k for k in keys[use] if k not in covered]
        if any(granted[k] for k in own):
            partial[use] = [s for k in own if not granted[k] for s in signatures[k]]
        else:
            none.append(use)
    details = {"can": full, "missing": {u: [s for _, s in m] for u, m in partial.items()}}
    if partial:
        use, missing = next(iter(partial.items()))
        names = ", ".join(s for _, s in missing[:3]) + (" …" if len(missing) > 3 else "")
        return Finding(
            "privileges",
            Level.PROBLEM,
            f"role {role} holds some of the grants of {use!r} but lacks {len(missing)}: {names}",
            _grant(quote_role(role), missing),
            details=details,
        )
    if not full:
        return Finding(
            "privileges",
            Level.PROBLEM,
            f"role {role} holds the grants of no use ({', '.join(needs)})",
            "grant it what its use needs: docs/security.md",
            details=details,
        )
    return Finding(
        "privileges",
        Level.OK,
        f"role {role} can: {', '.join(full)}"
        + (f"; not granted: {', '.join(none)}" if none else ""),
        details=details,
    )
