"""The lock order of docs/migrations.md, what a migration step locks (read from ``pg_locks``),
and the order in which a daemon statement locks the tables (probed with a held lock)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path

import asyncpg

from doc_snippets import blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrations.md"
HEADING = "### The lock order"

# pg_locks' names of the table lock modes, weakest first; and how LOCK TABLE spells each.
MODES = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
_SQL_MODE = {re.sub(r"(?<!^)(?=[A-Z])", " ", m).removesuffix(" Lock").upper(): m for m in MODES}
_LOCK_HEAD = re.compile(
    r"LOCK\s+TABLE\s+(?P<tables>chunkd\.\w+(?:\s*,\s*chunkd\.\w+)*)\s+"
    r"IN\s+(?P<mode>[A-Z ]+?)\s+MODE\s*;",
    re.IGNORECASE,
)


def documented_order() -> tuple[str, ...]:
    """The tables of the first ``text`` block under the heading, in their order."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    at = lines.index(HEADING) + 1
    block = next(b for b in blocks(DOC) if b.line > at and b.lang == "text")
    return tuple(re.findall(r"chunkd\.[a-z_0-9]+", block.text))


def order_key(table: str, order: tuple[str, ...]) -> tuple[int, str]:
    """Where ``table`` goes: its place in the order, or after those, alphabetically."""
    return (order.index(table), "") if table in order else (len(order), table)


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def split_head(sql: str) -> tuple[re.Match[str] | None, str]:
    """The ``LOCK TABLE`` that opens ``sql`` (comments aside), and the rest."""
    text = _strip_comments(sql)
    head = _LOCK_HEAD.match(text.lstrip())
    if head is None:
        return None, sql
    return head, text.lstrip()[head.end() :]


async def locks_taken(conn: asyncpg.Connection, sql: str) -> dict[str, str]:
    """chunkd table -> the strongest mode ``sql`` locks it in, for tables that existed before
    it ran (run in a transaction that is rolled back, with migrate's search_path)."""
    tables_query = (
        "SELECT c.oid, 'chunkd.' || c.relname AS name FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'chunkd' AND c.relkind IN ('r', 'p')"
    )
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        tables = {r["oid"]: r["name"] for r in await conn.fetch(tables_query)}
        await conn.execute(sql)
        rows = await conn.fetch(
            "SELECT l.relation, l.mode FROM pg_locks l WHERE l.pid = pg_backend_pid()"
            " AND l.locktype = 'relation' AND l.granted AND l.relation = ANY ($1::oid[])",
            list(tables),
        )
    finally:
        await transaction.rollback()
    taken: dict[str, str] = {}
    for row in rows:
        name = tables[row["relation"]]
        if name not in taken or MODES.index(row["mode"]) > MODES.index(taken[name]):
            taken[name] = row["mode"]
    return taken


def lock_problems(what: str, sql: str, taken: dict[str, str], order: tuple[str, ...]) -> list[str]:
    """What is wrong with the locks of ``sql`` (``taken``: :func:`locks_taken` of its body,
    without its head) by the rule of docs/migrations.md; [] when nothing."""
    strong = MODES.index("ShareUpdateExclusiveLock")
    strongest = max((MODES.index(m) for m in taken.values()), default=0)
    head, _ = split_head(sql)
    if strongest <= strong and head is None:
        return []
    wanted = sorted(
        (t for t, m in taken.items() if m == "RowExclusiveLock" or MODES.index(m) > strong),
        key=lambda t: order_key(t, order),
    )
    mode = MODES[max(strongest, MODES.index("AccessShareLock"))]
    spelled = next(sql_mode for sql_mode, m in _SQL_MODE.items() if m == mode)
    statement = f"LOCK TABLE {', '.join(wanted)} IN {spelled} MODE;"
    if head is None:
        return [f"{what} takes {mode} without a LOCK TABLE first: begin it with {statement}"]
    listed = [t.strip() for t in head["tables"].split(",")]
    head_mode = _SQL_MODE.get(" ".join(head["mode"].upper().split()))
    if listed != wanted or head_mode is None or MODES.index(head_mode) < strongest:
        return [f"{what} begins with {' '.join(head[0].split())!r}: it should be {statement}"]
    return []


async def lock_order_of(
    dsn: str, sql: str, args: tuple[object, ...] = (), *, tables: list[str]
) -> list[str]:
    """The order in which ``sql`` (run with a cached plan: six times first, as a daemon's
    long-lived connection runs it) locks ``tables``: for each, one session holds it ACCESS
    EXCLUSIVE while another runs ``sql`` in a transaction that is rolled back; the tables the
    runner holds while it waits come before it. Tables it never waits for are left out.
    Raises AssertionError when what it holds does not make one order."""
    holder = await asyncpg.connect(dsn)
    runner = await asyncpg.connect(dsn)
    try:
        pid = await runner.fetchval("SELECT pg_backend_pid()")
        for _ in range(6):
            warm_up = runner.transaction()
            await warm_up.start()
            try:
                await runner.fetch(sql, *args)
            finally:
                await warm_up.rollback()
        held_before: dict[str, frozenset[str]] = {}
        for table in tables:
            async with holder.transaction():
                await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                transaction = runner.transaction()
                await transaction.start()
                call = asyncio.ensure_future(runner.fetch(sql, *args))
                held = await _held_while_waiting(holder, pid, call)
            try:
                await call
            finally:
                await transaction.rollback()
            if held is not None:
                held_before[table] = held
        found = sorted(held_before, key=lambda t: len(held_before[t]))
        for before, after in itertools.pairwise(found):
            assert held_before[before] | {before} <= held_before[after], held_before
        return found
    finally:
        await holder.close()
        await runner.close()


async def _held_while_waiting(
    watcher: asyncpg.Connection, pid: int, call: asyncio.Future[object]
) -> frozenset[str] | None:
    """The chunkd tables ``pid`` holds once it waits for a lock; None if ``call`` ends first."""
    deadline = time.monotonic() + 10
    while not call.done():
        rows = await watcher.fetch(
            "SELECT 'chunkd.' || c.relname AS name, l.granted FROM pg_locks l"
            " JOIN pg_class c ON c.oid = l.relation"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE l.pid = $1 AND l.locktype = 'relation' AND n.nspname = 'chunkd'"
            " AND c.relkind IN ('r', 'p')",
            pid,
        )
        if any(not r["granted"] for r in rows):
            return frozenset(r["name"] for r in rows if r["granted"])
        assert time.monotonic() < deadline, "the statement neither waited nor ended"
        await asyncio.sleep(0.002)
    return None
