"""``chunkd retention`` and ``chunkd retention set STATE DURATION`` through the real CLI entry
point, and ``chunkd status`` over a history."""

from __future__ import annotations

import json

import pytest

from history_helpers import rounds_until_idle
from sql_helpers import claim, complete, create_job
from test_cli_ops import _restore_logging, run_cli

__all__ = ["_restore_logging"]  # the autouse fixture, re-exported so it applies here too


async def test_policies_are_shown_and_set(database, conn) -> None:
    shown = await run_cli("retention", dsn=database.dsn)
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout == (
        "completed  kept 3d after it finished\n"
        "failed     kept 30d after it finished\n"
        "cancelled  kept 7d after it finished\n"
    )
    result = await run_cli("retention", "set", "completed", "36h", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "completed  kept 36h after it finished"
    result = await run_cli("retention", "set", "Failed", "90m", dsn=database.dsn)
    assert result.exit_code == 0, result.stderr
    as_json = json.loads((await run_cli("retention", "--json", dsn=database.dsn)).stdout)
    assert [(p["state"], p["keep_s"], p["keep"]) for p in as_json] == [
        ("completed", 129600.0, "36h"),
        ("failed", 5400.0, "90m"),
        ("cancelled", 604800.0, "7d"),
    ]
    assert await conn.fetchval("SELECT keep_s FROM chunkd.retention WHERE state = 'failed'") == (
        5400
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("set", "done", "3d"), "no retention state 'done': completed, failed or cancelled"),
        (("set", "completed", "soon"), "'soon' is not a duration"),
        (
            ("set", "completed", "500ms"),
            "a retention must be between 1 second and 36500 days, got '500ms'",
        ),
        (("set", "completed", "36501d"), "between 1 second and 36500 days, got '36501d'"),
        (("set", "completed", "-3d"), "'-3d' is not a duration"),
        (("set", "completed", "9" * 30 + "s"), "is too long (at most 999999999 days)"),
        (("set", "completed"), "use `chunkd retention` to show the policies, or"),
        (("show",), "use `chunkd retention` to show the policies, or"),
    ],
)
async def test_bad_input_is_one_line_and_changes_nothing(
    database, conn, args: tuple[str, ...], line: str
) -> None:
    before = await conn.fetch("SELECT * FROM chunkd.retention ORDER BY state")
    result = await run_cli("retention", *args, dsn=database.dsn)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and line in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert await conn.fetch("SELECT * FROM chunkd.retention ORDER BY state") == before


async def test_status_lists_and_counts_jobs_in_the_history(database, conn) -> None:
    jobs = [await create_job(conn, 2, kind="old") for _ in range(3)]
    for row in await claim(conn, "w", 6, kinds=["old"]):
        assert await complete(conn, row["queue_id"], "w", row["attempt"])
    await rounds_until_idle(conn)
    live = await create_job(conn, 4, kind="new")
    listing = await run_cli("status", "--limit", "2", dsn=database.dsn)
    assert listing.exit_code == 0, listing.stderr
    assert "showing the newest 2 of 4 jobs" in listing.stdout
    assert str(live)[:8] in listing.stdout
    as_json = json.loads((await run_cli("status", "--json", dsn=database.dsn)).stdout)
    assert {j["sync_job_id"] for j in as_json} == {str(j) for j in (*jobs, live)}
    detail = json.loads((await run_cli("status", str(jobs[0]), "--json", dsn=database.dsn)).stdout)
    assert (detail["overall_status"], detail["completed_chunks"]) == ("completed", 2)
