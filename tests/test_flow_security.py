"""The flow-control role of docs/security.md: exactly enough for ``chunkd pause``, ``resume``
and ``limit``, and nothing else."""

from __future__ import annotations

import asyncpg
import pytest

from chunkd.db import connect
from sql_helpers import create_job
from test_cli_ops import _restore_logging, run_cli
from test_security import _documented_grants, dsn_as, make_role

__all__ = ["_restore_logging", "make_role"]  # fixtures, re-exported so they apply here

FLOW_FUNCTIONS = _documented_grants("chunkd_flow")


async def test_flow_role_runs_the_flow_commands_and_nothing_else(conn, database, make_role) -> None:
    job = await create_job(conn, 3, kind="mail")
    role = await make_role(FLOW_FUNCTIONS)
    dsn = dsn_as(database.dsn, role)
    for args in (
        ("pause", str(job)),
        ("resume", str(job)),
        ("pause", "--kind", "mail"),
        ("resume", "--kind", "mail"),
        ("limit", "--kind", "mail", "20/s", "--burst", "5"),
        ("limit", "--key", "tenant-1", "--concurrency", "2"),
        ("limit", "--list"),
    ):
        result = await run_cli(*args, dsn=dsn)
        assert result.exit_code == 0, (args, result.stderr)
    assert await conn.fetchval("SELECT per_second FROM chunkd.kind_flow WHERE kind = 'mail'") == 20
    events = await conn.fetch("SELECT event, worker_id FROM chunkd.events ORDER BY id")
    assert [tuple(e) for e in events] == [(e, role) for e in ("paused", "resumed") * 2], (
        "the audit trail names the role that paused and resumed"
    )

    flow = await connect(dsn)
    try:
        for statement, args in (
            ("SELECT chunkd.create_sync_job('k', '[1]')", ()),
            ("SELECT * FROM chunkd.claim_or_wait('me', 1, NULL, 60)", ()),
            ("SELECT chunkd.cancel_sync_job($1)", (job,)),
            ("SELECT * FROM chunkd.kind_flow", ()),
            ("SELECT * FROM chunkd.sync_jobs", ()),
            ("UPDATE chunkd.jobs SET paused_at = now()", ()),
            ("DELETE FROM chunkd.concurrency_limits", ()),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await flow.execute(statement, *args)
    finally:
        await flow.close()
