"""examples/imap-sync end to end: a real Dovecot with 2,000 messages in four folders, a planner
job that creates a job per folder, each folder's UID ranges discovered by continuation, a
daemon SIGKILLed mid-sync; every message ends up in the table exactly once, and every job's
job_finished event fires once (audit row and NOTIFY)."""

from __future__ import annotations

import collections
import json
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from chunkd.db import connect
from daemon_helpers import wait_until
from imap_server import ImapServer, dovecot

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "imap-sync"
FOLDERS = {"INBOX": 800, "Archive": 600, "Sent": 400, "Work": 200}


@pytest.fixture(scope="module")
def imap() -> ImapServer:  # type: ignore[misc]
    with dovecot(FOLDERS) as server:
        yield server


async def test_a_mailbox_synced_by_continuation_survives_a_sigkill(
    conn: asyncpg.Connection, database, start, imap: ImapServer
) -> None:
    assert sum(FOLDERS.values()) >= 2000
    # The example's table lives where an application's would (schema public); chunkd's own
    # connections pin search_path to pg_catalog, so this test's connection names it.
    await conn.execute("SET search_path = public, pg_catalog")
    await conn.execute((EXAMPLE / "schema.sql").read_text())
    finished: list[str] = []
    listener = await connect(database.dsn)
    await listener.add_listener("chunkd_job_finished", lambda *a: finished.append(a[3]))
    try:
        planner = await conn.fetchval(
            "SELECT chunkd.create_sync_job('imap_plan', '[{}]'::jsonb, $1::jsonb)",
            json.dumps({"host": imap.host, "port": imap.port, "user": imap.user,
                        "page_size": 20, "page_delay_s": 0.05}),
        )  # fmt: skip
        args = [
            "--handler", "imap_plan=imap_sync:plan", "--handler", "imap_sync=imap_sync:sync_folder",
            "--concurrency", "4", "--lease", "2s", "--reap-interval", "300ms",
        ]  # fmt: skip
        env = {
            "IMAP_SYNC_PASSWORD": imap.password,
            "PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]),
        }
        daemons = [start(*args, env=env) for _ in range(2)]

        async def holder_mid_sync() -> str | None:
            return await conn.fetchval(
                "SELECT a.worker_id FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id "
                "WHERE j.kind = 'imap_sync' AND a.ended_at IS NULL "
                "AND (SELECT count(*) FROM imap_messages) >= 300 LIMIT 1"
            )

        worker_id = await wait_until(holder_mid_sync, timeout_s=60, what="300 messages synced")
        pid = int(worker_id.split(":")[1])
        victim = next(d for d in daemons if d.pid == pid)
        os.kill(pid, signal.SIGKILL)
        victim.process.wait(10)
        synced_at_kill = await conn.fetchval("SELECT count(*) FROM imap_messages")
        assert synced_at_kill < 2000, "the kill landed in the middle of the sync"
        start(*args, env=env)

        async def all_finished() -> bool:
            return await conn.fetchval(
                "SELECT count(*) = 4 FROM chunkd.sync_jobs "
                "WHERE kind = 'imap_sync' AND finished_at IS NOT NULL"
            )

        await wait_until(all_finished, timeout_s=120, what="every folder synced")

        rows = await conn.fetch("SELECT folder, uidvalidity, uid, message_id FROM imap_messages")
        assert len(rows) == 2000
        by_folder = collections.defaultdict(list)
        for r in rows:
            by_folder[r["folder"]].append(r["message_id"])
        for folder, ids in imap.messages.items():
            assert sorted(by_folder[folder]) == sorted(ids), folder
        # Exactly once: no message under two UIDs either.
        assert len({(r["folder"], r["message_id"]) for r in rows}) == 2000

        jobs = await conn.fetch(
            "SELECT j.id, j.total_chunks, p.payload->>'folder' AS folder "
            "FROM chunkd.sync_jobs j CROSS JOIN LATERAL (SELECT j.payload) p "
            "WHERE j.kind = 'imap_sync'"
        )
        for job in jobs:
            # No chunk list up front: one page per 20 messages, discovered one by one.
            assert job["total_chunks"] == -(-FOLDERS[job["folder"]] // 20)
            progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job["id"])
            assert progress["overall_status"] == "completed" and progress["total_is_final"]
        events = await conn.fetch(
            "SELECT sync_job_id, count(*) AS n FROM chunkd.job_events "
            "WHERE event = 'job_finished' GROUP BY 1"
        )
        expected = {job["id"] for job in jobs} | {planner}
        assert {e["sync_job_id"] for e in events} == expected
        assert {e["n"] for e in events} == {1}
        await listener.execute("SELECT 1")  # deliver pending notifications
        assert sorted(finished) == sorted(f"{j} completed" for j in expected)
        reaped = await conn.fetchval(
            "SELECT count(*) FROM chunkd.chunk_events e JOIN chunkd.sync_jobs j "
            "ON j.id = e.sync_job_id WHERE j.kind = 'imap_sync' AND e.event = 'reaped'"
        )
        assert reaped >= 1, "the killed daemon held a page, recovered by the reaper"
    finally:
        await listener.close()


async def test_the_example_under_chunkd_testing_a_page_run_twice_stores_it_once(
    database, imap: ImapServer, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import imap_sync

    import chunkd.testing

    monkeypatch.setattr(imap_sync, "_pool", None)  # the handlers' pool, on this test's database
    monkeypatch.setenv("CHUNKD_DSN", database.dsn)
    monkeypatch.setenv("IMAP_SYNC_PASSWORD", imap.password)
    conn = await asyncpg.connect(database.dsn)  # the default search_path, as the example's
    try:
        await conn.execute((EXAMPLE / "schema.sql").read_text())
        mailbox = {"host": imap.host, "port": imap.port, "user": imap.user, "page_size": 100}
        await chunkd.create_sync_job(conn, "imap_plan", [{}], payload=mailbox)
        planned = await chunkd.testing.drain(imap_sync.app, database.dsn, kinds=["imap_plan"])
        assert planned["completed"] == 1
        await chunkd.testing.assert_enqueued(conn, kind="imap_sync", count=len(FOLDERS))

        twice = await chunkd.testing.run_twice(imap_sync.app, database.dsn, kind="imap_sync")
        assert [run.outcome for run in twice.runs] == ["lost", "completed"]
        assert twice.first.result == twice.second.result  # the same page, synced twice
        assert await conn.fetchval("SELECT count(*) FROM imap_messages") == 100

        counts = await chunkd.testing.drain(imap_sync.app, database.dsn, raise_errors=True)
        assert counts["failed"] == counts["retried"] == 0
        rows = await conn.fetch("SELECT folder, message_id FROM imap_messages")
        assert len(rows) == len({(r["folder"], r["message_id"]) for r in rows}) == 2000
        totals = await conn.fetch(
            "SELECT payload->>'folder' AS folder, total_chunks FROM chunkd.sync_jobs "
            "WHERE kind = 'imap_sync'"
        )
        # One chunk per page: the lost first delivery appended no page.
        assert {t["folder"]: t["total_chunks"] for t in totals} == {
            folder: -(-count // 100) for folder, count in FOLDERS.items()
        }
    finally:
        await conn.close()
        if imap_sync._pool is not None:
            await imap_sync._pool.close()
