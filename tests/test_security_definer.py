"""Every function a role is granted in docs/security.md runs as the owner with a pinned
search_path (``SECURITY DEFINER``, ``search_path=pg_catalog, pg_temp``), and every
``SECURITY DEFINER`` function of the schema pins it: a function that runs with the owner's
rights must not resolve a name through the caller's search_path."""

from __future__ import annotations

import re

import asyncpg

from test_security import SECURITY_PAGE

PINNED = "search_path=pg_catalog, pg_temp"


def _every_documented_grant() -> dict[str, set[str]]:
    """Function (as docs/security.md spells it) -> the roles it grants EXECUTE on it to."""
    page = SECURITY_PAGE.read_text(encoding="utf-8")
    grants: dict[str, set[str]] = {}
    for functions, role in re.findall(
        r"GRANT EXECUTE ON FUNCTION\s+((?:(?!GRANT).)*?)\s+TO (\w+);", page, re.DOTALL
    ):
        for signature in re.findall(r"chunkd\.\w+\([^)]*\)", functions):
            grants.setdefault(signature, set()).add(role)
    return grants


async def _problems(conn: asyncpg.Connection, granted: list[str]) -> list[str]:
    """What breaks the rule: a granted function that is not SECURITY DEFINER or not pinned,
    a SECURITY DEFINER function of schema chunkd that is not pinned."""
    rows = await conn.fetch(
        "SELECT p.oid::regprocedure::text AS function, p.prosecdef,"
        " $2 = ANY (coalesce(p.proconfig, '{}')) AS pinned,"
        " p.oid = ANY (ARRAY(SELECT to_regprocedure(g) FROM unnest($1::text[]) g)) AS granted"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'chunkd' ORDER BY 1",
        granted,
        PINNED,
    )
    problems = []
    for r in rows:
        if r["granted"] and not r["prosecdef"]:
            problems.append(f"{r['function']}: granted, not SECURITY DEFINER")
    for r in rows:
        if (r["granted"] or r["prosecdef"]) and not r["pinned"]:
            why = "granted" if r["granted"] else "SECURITY DEFINER"
            problems.append(f"{r['function']}: {why}, search_path not pinned")
    return problems


async def test_every_granted_function_is_security_definer_and_every_one_of_those_pinned(
    conn,
) -> None:
    grants = _every_documented_grant()
    assert {"chunkd_worker", "chunkd_enqueue", "chunkd_flow", "chunkd_web"} <= set().union(
        *grants.values()
    ), "the page's grant lists were read"
    missing = [g for g in grants if await conn.fetchval("SELECT to_regprocedure($1)", g) is None]
    assert missing == [], f"docs/security.md grants functions that do not exist: {missing}"
    assert await _problems(conn, list(grants)) == []


async def test_the_check_finds_a_granted_helper_and_an_unpinned_definer(conn) -> None:
    """It can fail: an internal helper (neither SECURITY DEFINER nor pinned) granted to a role,
    and a SECURITY DEFINER function without a pinned search_path."""
    await conn.execute(
        "CREATE FUNCTION chunkd.planted_definer() RETURNS int LANGUAGE sql SECURITY DEFINER"
        " RETURN 1"
    )
    granted = [*_every_documented_grant(), "chunkd.clip_error(text)"]
    assert await _problems(conn, granted) == [
        "chunkd.clip_error(text): granted, not SECURITY DEFINER",
        "chunkd.clip_error(text): granted, search_path not pinned",
        "chunkd.planted_definer(): SECURITY DEFINER, search_path not pinned",
    ]
