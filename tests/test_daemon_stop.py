"""Graceful stops of ``chunkd run`` when the database answers slowly, or not at all.

The daemon connects through :class:`delay_proxy.DelayProxy`, which holds what the server sends
back for a while: a claim commits on the server while its reply is still on its way.
"""

from __future__ import annotations

import signal
import time

import pytest

from daemon_helpers import wait_until
from delay_proxy import DelayProxy
from sql_helpers import create_job, status_counts

# What a stop may take beyond --shutdown-timeout however slow the database is (the bounds of
# chunkd.runtime.stop, and closing the pool), plus slack for a loaded machine.
STOP_BOUND_S = 3.0 + 10.0 + 1.0 + 1.0 + 3.0


@pytest.fixture
async def proxy(database):
    p = await DelayProxy(database.dsn, delay_s=0.0).start()
    yield p
    await p.close()


async def _processing(conn, job) -> bool:
    return (await status_counts(conn, job)).get("processing") == 1


async def test_sigterm_while_a_claim_reply_is_on_its_way_leaves_nothing_leased(
    conn, start, proxy
) -> None:
    daemon = start("--handler", "test=bad_handlers:echo", "--poll-interval", "60s", dsn=proxy.dsn())
    await daemon.wait_for_event("daemon.ready", timeout_s=30)
    proxy.delay_s = 1.5  # from now on every reply, a NOTIFY included, arrives 1.5 s late
    job = await create_job(conn, 1)
    # The NOTIFY reaches the daemon 1.5 s from now and it claims at once; the moment the
    # claim has committed, its reply is still 1.5 s away.
    await wait_until(
        lambda: _processing(conn, job), timeout_s=15, what="the claim to commit", interval_s=0.005
    )
    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(30) == 0
    took_s = time.monotonic() - stopped_at
    assert await status_counts(conn, job) == {"pending": 1}, "released, not left leased"
    row = await conn.fetchrow(
        "SELECT attempts, worker_id FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    assert row["attempts"] == 0, "a release spends no attempt"
    released = await conn.fetchval(
        "SELECT count(*) FROM chunkd.chunk_events WHERE sync_job_id = $1 AND event = 'released'",
        job,
    )
    assert released == 1
    assert await conn.fetchval("SELECT count(*) FROM chunkd.workers") == 0, "deregistered"
    events = [e["event"] for e in daemon.events()]
    assert "chunk.completed" not in events, "a claim answered after the stop is not started"
    assert "chunks.released" in events
    # The claim's answer (two round trips: its reply, and the pool's session reset), then one
    # statement of two round trips (prepare, execute), then closing the pool (bounded at 1 s).
    assert took_s < 4 * 1.5 + 1.0 + 2.0, f"the stop took {took_s:.1f}s"


async def test_stop_is_bounded_when_the_database_stops_answering(conn, start, proxy) -> None:
    job = await create_job(conn, [{"sleep_s": 0.1}] * 3)
    daemon = start(
        "--handler", "test=bad_handlers:slow_echo", "--shutdown-timeout", "2s", dsn=proxy.dsn()
    )
    await wait_until(lambda: status_counts(conn, job), timeout_s=15, what="the job to be claimed")
    await wait_until(lambda: _all_completed(conn, job), timeout_s=15, what="the job to complete")
    proxy.delay_s = 3600.0  # the server's replies never arrive (a partition, a hung server)
    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(2.0 + STOP_BOUND_S + 10) == 0
    took_s = time.monotonic() - stopped_at
    assert took_s < 2.0 + STOP_BOUND_S, f"the stop took {took_s:.1f}s"
    events = daemon.events()
    unreachable = [e for e in events if e["event"] == "shutdown.db_unreachable"]
    assert len(unreachable) == 1, "it says why it could not deregister"
    assert "Traceback" not in daemon.log_text()


async def _all_completed(conn, job) -> bool:
    return await status_counts(conn, job) == {"completed": 3}
