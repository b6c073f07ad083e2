"""``/healthz`` and ``/readyz`` on the metrics port of a real ``chunkd run`` (issue #24, part 2).

``/healthz``: a handler blocking the event loop with ``time.sleep`` longer than
``--stall-threshold`` turns it unhealthy while the loop is blocked, and healthy again after.
``/readyz``: PostgreSQL really stopped turns it not-ready, and ready again once it is back; a
schema ahead of this chunkd turns it not-ready; through PgBouncer in transaction mode the poll
fallback counts as ready.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from chunkd.db import connect
from daemon_helpers import Daemon, wait_until
from pgbouncer import pgbouncer
from resources import pgbouncer_binary
from sql_helpers import create_job

Answer = tuple[int, dict[str, Any]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, path: str) -> Answer | None:
    """(status, JSON body) of ``path``; None while nothing listens yet."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(f"http://127.0.0.1:{port}{path}")
    except httpx.TransportError:
        return None
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


async def _until(port: int, path: str, status: int, *, timeout_s: float, what: str) -> Answer:
    async def answered() -> Answer | None:
        got = await _get(port, path)
        return got if got is not None and got[0] == status else None

    result: Answer = await wait_until(answered, timeout_s=timeout_s, what=what, interval_s=0.1)
    return result


def _daemon(start: Any, port: int, *args: str, dsn: str | None = None) -> Daemon:
    daemon: Daemon = start(
        "--handler", "block=bad_handlers:blocks_loop", "--handler", "echo=bad_handlers:echo",
        "--metrics-port", str(port), "--stall-threshold", "1s", *args,
        dsn=dsn,
    )  # fmt: skip
    return daemon


async def test_healthz_is_unhealthy_while_a_handler_blocks_the_loop(conn, start) -> None:
    port = _free_port()
    daemon = _daemon(start, port)
    await daemon.wait_for_event("daemon.ready")
    _status, body = await _until(port, "/healthz", 200, timeout_s=10, what="healthy")
    assert body["status"] == "ok" and body["event_loop"]["stalled"] is False
    assert {"claimer", "listener", "heartbeat", "readiness", "stall"} <= set(body["tasks"])
    assert all(t["state"] == "running" for t in body["tasks"].values())
    assert body["worker_id"].startswith(socket.gethostname())

    await create_job(conn, [{"block_s": 4}], kind="block")
    _status, body = await _until(port, "/healthz", 503, timeout_s=10, what="a stalled loop")
    assert body["status"] == "unhealthy"
    assert body["event_loop"]["stalled"] is True
    assert body["event_loop"]["since_last_tick_s"] > 1.0
    assert "event loop has not run" in body["problems"][0]
    # The metrics are still served meanwhile: the endpoint has a thread of its own.
    async with httpx.AsyncClient(timeout=2) as client:
        metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert metrics.status_code == 200 and "chunkd_chunks_claimed_total" in metrics.text

    _status, body = await _until(port, "/healthz", 200, timeout_s=15, what="healthy again")
    assert body["event_loop"]["stalled"] is False
    stalls = [e for e in daemon.events() if e["event"] == "event_loop.stalled"]
    assert len(stalls) == 1 and stalls[0]["stalled_s"] > 3


async def test_readyz_follows_a_real_postgres_stop_and_start(
    conn, database, start, managed_cluster
) -> None:
    port = _free_port()
    daemon = _daemon(start, port)
    _status, body = await _until(port, "/readyz", 200, timeout_s=15, what="ready")
    assert body["status"] == "ready" and body["phase"] == "running"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["schema"] == {
        "ok": True,
        "applied": body["checks"]["schema"]["expected"],
        "expected": body["checks"]["schema"]["expected"],
    }
    assert body["checks"]["listener"] == {"ok": True, "mode": "listen"}

    await asyncio.to_thread(managed_cluster.stop)
    try:
        _status, body = await _until(port, "/readyz", 503, timeout_s=15, what="not ready")
        assert body["status"] == "not_ready"
        assert body["checks"]["database"]["ok"] is False
        assert body["checks"]["listener"]["mode"] == "disconnected"
        # Alive all along: a database outage is no reason to restart the daemon.
        health = await _get(port, "/healthz")
        assert health is not None and health[0] == 200, health
    finally:
        await asyncio.to_thread(managed_cluster.start)

    _status, body = await _until(port, "/readyz", 200, timeout_s=30, what="ready again")
    assert all(check["ok"] for check in body["checks"].values()), body
    assert daemon.process.poll() is None
    # And it works again: a new job is run.
    fresh = await connect(database.dsn)
    try:
        job = await create_job(fresh, 2, kind="echo")

        async def done() -> bool:
            return bool(
                await fresh.fetchval(
                    "SELECT count(*) = 2 FROM chunkd.chunk_processing_queue"
                    " WHERE parent_sync_job_id = $1 AND status = 'completed'",
                    job,
                )
            )

        await wait_until(done, timeout_s=15, what="the job after the restart")
    finally:
        await fresh.close()


async def test_readyz_is_not_ready_while_the_schema_is_ahead(conn, start) -> None:
    port = _free_port()
    _daemon(start, port)
    await _until(port, "/readyz", 200, timeout_s=15, what="ready")
    await conn.execute("INSERT INTO chunkd.schema_migrations (version, name) VALUES (999, 'x')")
    _status, body = await _until(port, "/readyz", 503, timeout_s=10, what="schema ahead")
    schema = body["checks"]["schema"]
    assert schema["ok"] is False and "[999] unknown to this chunkd" in schema["error"]
    assert body["checks"]["database"]["ok"] is True
    await conn.execute("DELETE FROM chunkd.schema_migrations WHERE version = 999")
    await _until(port, "/readyz", 200, timeout_s=10, what="ready again")


@pytest.fixture(scope="module")
def bouncer(pg_server: Any) -> Iterator[str]:
    with pgbouncer(pgbouncer_binary(), pg_server.admin_dsn) as template:
        yield template


async def test_readyz_counts_the_poll_fallback_through_a_transaction_pooler(
    conn, database, start, bouncer: str
) -> None:
    port = _free_port()
    pooled = bouncer.format(db=urlsplit(database.dsn).path.lstrip("/"))
    _daemon(start, port, dsn=pooled)
    _status, body = await _until(port, "/readyz", 200, timeout_s=15, what="ready via PgBouncer")
    assert body["checks"]["listener"]["mode"] == "poll"
    assert body["checks"]["database"]["ok"] is True


async def test_probe_endpoints_answer_get_and_head_only(conn, start) -> None:
    port = _free_port()
    _daemon(start, port)
    await _until(port, "/readyz", 200, timeout_s=15, what="ready")
    async with httpx.AsyncClient(timeout=2) as client:
        head = await client.head(f"http://127.0.0.1:{port}/healthz")
        post = await client.post(f"http://127.0.0.1:{port}/readyz")
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405


async def test_the_metrics_port_answers_its_four_paths_and_404_for_any_other(conn, start) -> None:
    """A mistyped probe path must fail the probe, not pass with the metrics text."""
    port = _free_port()
    _daemon(start, port)
    await _until(port, "/readyz", 200, timeout_s=15, what="ready")
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=2) as client:
        for path in ("/", "/metrics"):
            got = await client.get(base + path)
            assert got.status_code == 200 and "chunkd_chunks_claimed_total" in got.text, path
        # prometheus-client's query parameters still work: name[] selects metric families.
        got = await client.get(base + "/metrics", params={"name[]": "chunkd_chunks_in_flight"})
        assert got.status_code == 200 and "chunkd_chunks_in_flight " in got.text
        assert "chunkd_chunks_claimed" not in got.text
        for path in ("/healthz/", "/readyz/", "/nope", "/metrics/", "/favicon.ico", "/health"):
            for method in ("GET", "HEAD"):
                got = await client.request(method, base + path)
                assert got.status_code == 404, (method, path, got.status_code)
        got = await client.get(base + "/healthz/")
    assert "/metrics, /healthz, /readyz" in got.text


def test_probes_rules_on_a_controlled_clock() -> None:
    """The rules themselves, on a clock the test moves: an ended task is unhealthy except
    while stopping; a round of readiness checks goes stale; a stop is not ready."""
    from chunkd.observability.probes import Probes

    now = [100.0]
    probes = Probes(stall_threshold_s=1.0, stale_after_s=6.0, clock=lambda: now[0])
    probes.task_state("claimer", "running")
    assert probes.healthz()[0] == 200
    assert probes.readyz()[1]["problems"] == ["starting: not connected and listening yet"]
    probes.set_phase("running")
    assert probes.readyz()[1]["problems"] == ["the first readiness checks have not finished yet"]
    probes.readiness({"database": {"ok": True}, "listener": {"ok": True, "mode": "listen"}})
    assert probes.readyz()[0] == 200
    now[0] += 1.5  # no tick for 1.5 s
    assert probes.healthz()[0] == 503
    probes.tick()
    assert probes.healthz()[0] == 200
    now[0] += 5.0
    probes.tick()
    code, body = probes.readyz()
    assert code == 503 and "ran 6.5 s ago" in body["problems"][0]
    probes.readiness({"database": {"ok": False, "error": "connection refused"}})
    assert probes.readyz()[1]["problems"] == ["database: connection refused"]
    probes.task_state("claimer", "restarting")
    code, body = probes.healthz()
    assert code == 200 and body["tasks"]["claimer"] == {"state": "restarting", "crashes": 1}
    probes.task_state("claimer", "ended")
    assert probes.healthz()[1]["problems"] == ["task(s) ended: claimer"]
    probes.set_phase("stopping")
    assert probes.healthz()[0] == 200
    assert probes.readyz()[1]["problems"] == ["stopping: no new work is claimed"]


async def test_a_metrics_port_in_use_is_one_line(database, start) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = _daemon(start, port)
        assert await daemon.wait(timeout_s=30) == 2
    assert "Traceback" not in daemon.log_text()
    lines = daemon.log_text().strip().splitlines()
    assert lines[-1] == (
        f"chunkd: error: cannot serve metrics on 0.0.0.0:{port} (--metrics-port): "
        "Address already in use"
    ), lines
