"""Every statement the daemon, the metrics sampler, the dashboard and the CLI run on a schedule
keeps its plan on tables that were never analyzed (issue 25, part 3).

A database that autovacuum has not analyzed yet (a fresh install, a burst of writes) has no
statistics: the planner guesses, and two guesses went wrong. It compiled plans to machine code
(JIT, for a plan whose estimated cost passes jit_above_cost: 30 ms to compile a 1 ms query, and
queue_depth() took 29-37 ms per call with 40,000 finished jobs until the first ANALYZE), and it
hashed whole tables where an index probe was all that was needed. Here: a database with 100,000
finished chunks in the history and 27,000 live jobs (20,000 finished and not moved yet), filled
without ANALYZE and with autovacuum off on every table, and each statement:

- runs with auto_explain logging the plan of every statement it runs, nested ones included: no
  plan is compiled (JIT), none scans a history partition, none scans a live table except the
  statements that count all of it (the queue's depth, the live jobs by status);
- is timed, 8 runs on one connection (as a daemon or a dashboard connection runs it again and
  again): the median within the bound of its group (below), the first run (planning included)
  within 4 times that.

Bounds: 5 ms for the daemon's and the metrics' statements (the claim, renewals, the reaper, the
timers, queue_depth), 25 ms for a maintenance round that moves a job, 25 ms for the dashboard's
and the CLI's (they read the history, whose ~45 partitions each take planning time), 50 ms for
the counts of the live jobs by status and their kinds (they read every live job: 27,000 here,
20,000 of them finished and not moved, as with the maintenance off).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db.sql_files import queries

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from history_fill import fill_history, fill_live, make_partitions

DAEMON_MS = 5.0
ROUND_MS = 25.0
READ_MS = 25.0
COUNT_MS = 50.0
RUNS = 8

# Statements that read a whole live table by design: counting every ready chunk, every live
# job; a status filter of the jobs page (the live jobs: the maintenance keeps them few; the
# history's through their status index); the first ready chunk of a daemon's kinds (EXISTS stops
# at it; ready has no index by kind, whatever the statistics).
WHOLE_TABLE = {
    "queue_depth": {"ready", "scheduled"},
    "web_queue_depth": {"ready", "scheduled"},
    "web_queue_depth_by_kind": {"ready", "scheduled"},
    "ops_job_total": {"jobs"},
    "web_job_facets": {"jobs"},
    "web_kinds": {"jobs"},
    "web_jobs_page": {"jobs"},
    "next_due_in": {"ready"},
}
# The live tables this test fills (events stays empty: any plan of an empty table is right).
LIVE_TABLES = ("jobs", "chunks", "ready", "scheduled", "attempts")
HISTORY_SCAN = re.compile(r"Seq Scan on history_(jobs|chunks|attempts|events)_p")


@pytest.fixture(scope="module")
async def fresh(pg_server) -> Any:
    """The database, filled once for the module (never analyzed), and the ids the statements
    take."""
    from chunkd.testing.server import create_database, drop_database

    name = await create_database(pg_server, prefix="chunkd_fresh")
    dsn = pg_server.dsn(name)
    conn = await connect(dsn)
    try:
        await make_partitions(conn)
        tables = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'chunkd'::regnamespace"
            " AND relkind = 'r'"
        )
        for (table,) in tables:
            await conn.execute(f"ALTER TABLE chunkd.{table} SET (autovacuum_enabled = off)")
        await fill_history(conn, 20_000, 5)
        await fill_live(conn, finished=20_000, pending=5_000, waiting=1_000, processing=1_000)
        analyzed = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'chunkd'::regnamespace"
            " AND relkind = 'r' AND reltuples >= 0 AND relpages > 0"
        )
        assert analyzed == 0, "a table has statistics: the test would prove nothing"
        ids = dict(
            await conn.fetchrow(
                "SELECT (SELECT public_id FROM chunkd.history_jobs"
                "        WHERE status = 'partial_failure' LIMIT 1) AS old,"
                " (SELECT public_id FROM chunkd.jobs WHERE finished_at IS NULL"
                "   AND started_at IS NOT NULL ORDER BY id DESC LIMIT 1) AS live"
            )
        )
    finally:
        await conn.close()
    yield dsn, ids
    await drop_database(pg_server, name)


def with_bound(
    entries: list[tuple[Any, ...]],
) -> list[tuple[str, tuple[Any, ...], float]]:
    """(name, args) entries get READ_MS; (name, args, bound) keep theirs."""
    return [(e[0], e[1], e[2] if len(e) > 2 else READ_MS) for e in entries]


def statements(ids: dict[str, Any]) -> list[tuple[str, str, tuple[Any, ...], float]]:
    q, web = queries(), queries("web.sql")
    old, live = ids["old"], ids["live"]
    now = datetime.now(UTC)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    daemon = [
        ("claim_batch", ("w9", 10, None, 60.0, None, 10)),
        ("renew_attempts", ("w1", [1, 2, 3], [1, 1, 1], 60.0)),
        ("reap_expired", ()),
        ("prune_workers", (900.0,)),
        ("worker_alive", ("w1", 5.0, "h", 1, "0.3.0", [], 4)),
        ("next_due_in", (None,)),
        ("schedules_due", (now, 100)),
        ("next_schedule_at", ()),
        ("queue_depth", ()),
    ]
    cli = [
        ("ops_recent_job_ids", (20,)),
        ("ops_job_total", (), COUNT_MS),
        ("ops_flow_limits", ()),
        ("ops_job_progress", (old,)),
        ("ops_job_settings", (old,)),
        ("ops_recent_errors", (old, 10)),
        ("ops_job_progress", (live,)),
        ("ops_job_settings", (live,)),
        ("ops_recent_errors", (live, 10)),
        ("ops_live_worker_for_kind", ("import", None, 120.0)),
    ]
    dashboard = [
        ("web_jobs_page", (None, None, None, 51, 0)),
        ("web_jobs_page", (None, None, "partial_failure", 51, 0)),
        ("web_jobs_page", (None, "import", None, 51, 0)),
        ("web_jobs_page", ("imp", None, None, 51, 0)),
        ("web_jobs_page", (None, None, None, 51, 100)),
        ("web_job_facets", (None,), COUNT_MS),
        ("web_kinds", (), COUNT_MS),
        ("web_queue_depth", ()),
        ("web_queue_depth_by_kind", ()),
        ("web_workers", (None, 120.0)),
        *[
            (name, (job, *rest))
            for job in (old, live)
            for name, rest in (
                ("web_job_progress", ()),
                ("web_job_settings", ()),
                ("web_job_flow", ()),
                ("web_job_events", (20,)),
                ("web_chunk_map", ()),
                ("web_job_throughput", (1.0, since)),
                ("web_job_errors", (10,)),
                ("web_chunk", (0,)),
                ("web_chunk_payload", (0,)),
                ("web_chunk_events", (1,)),
            )
        ],
    ]
    return [
        *[(name, q[name], args, DAEMON_MS) for name, args in daemon],
        ("retention_round", q["retention_round"], (1,), ROUND_MS),
        *[(name, q[name], args, *bound) for name, args, *bound in with_bound(cli)],
        *[(name, web[name], args, *bound) for name, args, *bound in with_bound(dashboard)],
    ]


async def _plans(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> list[str]:
    """The plans of ``sql`` and of every statement it runs (auto_explain), rolled back."""
    plans: list[str] = []

    def listen(_conn: Any, message: asyncpg.PostgresLogMessage) -> None:
        if "Query Text:" in str(message.message):
            plans.append(str(message.message))

    conn.add_log_listener(listen)
    try:
        async with conn.transaction():
            await conn.fetch(sql, *args)
            raise _Rollback
    except _Rollback:
        pass
    finally:
        conn.remove_log_listener(listen)
    return plans


class _Rollback(Exception):
    pass


async def test_every_scheduled_statement_keeps_its_plan_without_statistics(fresh) -> None:
    dsn, ids = fresh
    conn = await connect(dsn)
    try:
        await conn.execute("LOAD 'auto_explain'")
        await conn.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
            " SET auto_explain.log_level = notice; SET client_min_messages = notice"
        )
        problems = []
        for name, sql, args, _bound in statements(ids):
            allowed = WHOLE_TABLE.get(name, set())
            for plan in await _plans(conn, sql, args):
                if "JIT:" in plan:
                    problems.append(f"{name}: compiled (JIT)\n{plan}")
                for line in plan.splitlines():
                    if HISTORY_SCAN.search(line):
                        problems.append(f"{name}: scans the history: {line.strip()}\n{plan}")
                    for table in LIVE_TABLES:
                        if f"Seq Scan on {table} " in line and table not in allowed:
                            problems.append(f"{name}: scans {table}: {line.strip()}\n{plan}")
        assert not problems, (
            "\n".join(p.splitlines()[0] for p in problems) + "\n\n" + ("\n\n".join(problems[:3]))
        )
    finally:
        await conn.close()


async def test_every_scheduled_statement_runs_within_its_bound_without_statistics(fresh) -> None:
    dsn, ids = fresh
    conn = await connect(dsn)
    try:
        slow = []
        report = []
        for name, sql, args, bound in statements(ids):
            times = []
            for _ in range(RUNS):
                started = time.perf_counter()
                try:
                    async with conn.transaction():
                        await conn.fetch(sql, *args)
                        raise _Rollback  # the claim and the round change nothing for the next run
                except _Rollback:
                    pass
                times.append((time.perf_counter() - started) * 1000)
            median = statistics.median(times)
            report.append(f"{name}: first {times[0]:.1f} ms, median {median:.1f} ms")
            if median > bound or times[0] > 4 * bound:
                slow.append(
                    f"{name} {args!r}: first {times[0]:.1f} ms, median {median:.1f} ms"
                    f" (bound {bound:g} ms)"
                )
        print("\n".join(report))
        assert not slow, "\n".join(slow)
    finally:
        await conn.close()
