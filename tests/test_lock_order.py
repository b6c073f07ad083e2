"""The order in which the daemon's statements lock the tables, measured (docs/migrations.md,
The lock order): every claim, 0.2's and this release's, locks ``chunkd.scheduled`` before any
other table, so a migration step that takes it first has waited only for the claims under way;
each statement's order is the one the page's table gives, and every statement but the claim
takes the tables other than ``scheduled`` in the documented order."""

from __future__ import annotations

import json
import re

import asyncpg

from chunkd.db import connect
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import queries
from lock_order import DOC, documented_order, lock_order_of, order_key

_TABLES = (
    "SELECT 'chunkd.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = 'chunkd' AND c.relkind = 'r' ORDER BY 1"
)


def _documented_statements() -> dict[str, list[str]]:
    """The page's table: statement -> its tables in order."""
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (an? [a-z ]+|the [a-z ]+) \| ((?:`[a-z_]+`[^|]*)+)\|$", text, re.M)
    return {name: [f"chunkd.{t}" for t in re.findall(r"`([a-z_]+)`", c)] for name, c in rows}


async def _work(conn: asyncpg.Connection) -> tuple[list[int], list[int]]:
    """A registered worker 'w1' holding ten claims of a 200-chunk job: their ids, attempts."""
    await conn.execute("SELECT chunkd.register_worker('w1', 'h', 1, '0.3.0', '{}'::text[], 4)")
    await conn.fetchval(
        "SELECT chunkd.create_sync_job('k', $1::jsonb, '{}')", json.dumps([{}] * 200)
    )
    rows = await conn.fetch("SELECT * FROM chunkd.claim_or_wait('w1', 10, NULL, 600, NULL)")
    return [r["id"] for r in rows], [r["attempt"] for r in rows]


async def test_the_claim_of_0_2_locks_scheduled_before_anything(empty_database: str) -> None:
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=9)  # 0.2's functions, as during an upgrade
        await _work(conn)
        tables = [r[0] for r in await conn.fetch(_TABLES)]
    finally:
        await conn.close()
    order = await lock_order_of(
        empty_database,
        "SELECT * FROM chunkd.claim_or_wait('w1', 1, NULL, 600, NULL)",
        tables=tables,
    )
    assert order[0] == "chunkd.scheduled", order
    assert order == _documented_statements()["a claim"]


async def test_the_daemons_statements_lock_in_the_documented_order(database, conn) -> None:
    ids, attempts = await _work(conn)
    q = queries()
    statements: dict[str, tuple[str, tuple[object, ...]]] = {
        "a claim": (q["claim_batch"], ("w1", 1, None, 600.0, None, 1)),
        "a completion": (q["complete_attempts"], ("w1", ids[:1], attempts[:1], [None])),
        "a lease renewal": (q["renew_attempts"], ("w1", ids[:1], attempts[:1], 600.0)),
        "a failure to retry": (
            q["fail_attempt"], ("w1", ids[1], attempts[1], "boom", True, 0.0, 2.0, 600.0)
        ),
        "an enqueue": ("SELECT chunkd.create_sync_job('k', '[{}, {}]'::jsonb)", ()),
        "the reaper": (q["reap_expired"], ()),
        "a heartbeat": (q["worker_alive"], ("w1", 20.0, "h", 1, "0.3.0", [], 4)),
    }  # fmt: skip
    tables = [r[0] for r in await conn.fetch(_TABLES)]
    measured = {
        name: await lock_order_of(database.dsn, sql, args, tables=tables)
        for name, (sql, args) in statements.items()
    }
    assert measured == _documented_statements()
    assert measured["a claim"][0] == "chunkd.scheduled"
    order = documented_order()
    for name, found in measured.items():
        if name == "a claim":
            continue  # gated: once a step holds scheduled, no claim holds anything
        rest = [t for t in found if t != "chunkd.scheduled"]
        assert rest == sorted(rest, key=lambda t: order_key(t, order)), (name, found)
