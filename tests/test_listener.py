"""The LISTEN connection under a server that ends idle sessions (issue #16, item 9).

The input: ``idle_session_timeout = 2s``. The listener pinged every 5 s, so the server ended
its session every 2 s and the daemon reconnected and warned each time. Now the listener reads
the timeout the server advertises and pings within it; the pool retires idle connections
before the server would cut them.
"""

from __future__ import annotations

import asyncio

from daemon_helpers import wait_until
from sql_helpers import create_job, status_counts

IDLE_TIMEOUT_S = 2.0


async def test_listener_stays_connected_under_a_short_idle_session_timeout(
    conn, database, start
) -> None:
    # For every new session of this database (the test's own connection is older).
    await conn.execute(
        f"ALTER DATABASE {database.name} SET idle_session_timeout = '{IDLE_TIMEOUT_S:g}s'"
    )
    daemon = start("--handler", "echo=bad_handlers:echo", "--poll-interval", "60s")
    connected = await daemon.wait_for_event("listener.connected")
    assert connected["ping_interval_s"] <= IDLE_TIMEOUT_S / 3
    await daemon.wait_for_event("daemon.ready")
    # The input: the daemon sits idle for three timeouts.
    await asyncio.sleep(3 * IDLE_TIMEOUT_S + 0.5)
    job = await create_job(conn, 2, kind="echo")

    async def done() -> bool:
        return await status_counts(conn, job) == {"completed": 2}

    # Only a NOTIFY can wake it this soon: the safety poll is a minute away.
    await wait_until(done, timeout_s=5, what="the job, woken by NOTIFY")
    events = daemon.events()
    assert [e["event"] for e in events].count("listener.connected") == 1
    noisy = [e for e in events if e["level"] in ("warning", "error")]
    assert noisy == [], noisy
    assert await daemon.stop() == 0
