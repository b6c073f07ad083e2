"""Where a chunk's time goes inside ``chunkd run``: the parts behind two benchmark rows.

``--scenario latency``: one-chunk jobs enqueued one at a time (each waits for the previous
one's handler), split into the enqueue's round trip, the NOTIFY's arrival, the claim's round
trip and the claim's rows reaching the handler.

It also reads the server time of the claim and of the enqueue per call
(``pg_stat_user_functions`` with ``track_functions = all``).

``--scenario sleep10``: 10,000 chunks with a 10 ms ``asyncio.sleep`` handler at concurrency
50: how long the sleep really takes, how long a claimed chunk waits between being handed to
a slot and its handler starting, and the mean number of handlers running (of 50); beside it
the ceiling of the loop alone: 50 tasks sleeping 10 ms in turn for 3 s, no database.

``--scenario statements``: single statements on the idle cluster, one connection, each
committed on its own: ``SELECT 1`` directly, through chunkd's pool and through a pool with
asyncpg's default reset on release; a one-row insert with a NOTIFY; chunkd's three enqueue
inserts (job, chunk, ready row) as one plain statement; ``create_sync_job``.

The daemon runs in-process (``run_daemon``) on a throwaway cluster with fsync on, as in
``chunkd_bench.py``; the claim and the NOTIFY are timed by wrapping ``Queue.claim`` and
``Claimer.on_notify`` (this process only). Prints one JSON object.

    .venv/bin/python bench/daemon_parts.py --scenario latency
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import asyncpg
import chunkd_bench
import uvloop

from chunkd import Chunk
from chunkd.db import Queue, connect, create_pool
from chunkd.db.migrate import apply_migrations
from chunkd.demo.cluster import PostgresCluster
from chunkd.handlers import HandlerRegistry
from chunkd.observability.logs import configure_logging
from chunkd.runtime.claimer import Claimer
from chunkd.runtime.supervisor import run_daemon

KIND = chunkd_bench.KIND
marks: dict[str, list[Any]] = {"notify": [], "claim_sent": [], "claim_back": [], "handed": []}


def _wrap_for_timing() -> None:
    on_notify, claim, dispatch = Claimer.on_notify, Queue.claim, Claimer._dispatch

    def timed_on_notify(self: Claimer, payload: str) -> None:
        marks["notify"].append(time.perf_counter())
        on_notify(self, payload)

    async def timed_claim(self: Queue, *args: Any, **kwargs: Any) -> Any:
        marks["claim_sent"].append(time.perf_counter())
        result = await claim(self, *args, **kwargs)
        marks["claim_back"].append((time.perf_counter(), len(result.rows)))
        return result

    def timed_dispatch(self: Claimer) -> None:
        marks["handed"].append((time.perf_counter(), len(self._ready)))
        dispatch(self)

    Claimer.on_notify = timed_on_notify  # type: ignore[method-assign]
    Queue.claim = timed_claim  # type: ignore[method-assign]
    Claimer._dispatch = timed_dispatch  # type: ignore[method-assign]


def _ms(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "p50_ms": round(s[len(s) // 2] * 1000, 3),
        "p90_ms": round(s[int(len(s) * 0.9)] * 1000, 3),
        "mean_ms": round(statistics.mean(s) * 1000, 3),
    }


async def _latency(dsn: str, count: int) -> dict[str, Any]:
    producer = await connect(dsn)
    await producer.execute("SET track_functions = 'all'")  # the enqueue's session
    await producer.execute("ALTER DATABASE parts SET track_functions = 'all'")  # the daemon's
    await producer.execute("SELECT pg_stat_reset()")
    started: dict[int, float] = {}
    ran = asyncio.Event()

    async def handler(chunk: Chunk) -> None:
        started[chunk.payload] = time.perf_counter()
        ran.set()

    stop = asyncio.Event()
    settings = chunkd_bench.daemon_settings("latency", dsn)
    daemon = asyncio.create_task(
        run_daemon(settings, HandlerRegistry(handlers={KIND: handler}), stop)
    )
    parts: list[tuple[float, ...]] = []
    try:
        for i in range(-20, count):  # the first 20 warm up
            ran.clear()
            for values in marks.values():
                values.clear()
            sent = time.perf_counter()
            await producer.fetchval("SELECT chunkd.create_sync_job($1, $2::jsonb)", KIND, f"[{i}]")
            returned = time.perf_counter()
            await asyncio.wait_for(ran.wait(), 10)
            if i < 0 or not marks["notify"]:
                continue
            notified = marks["notify"][0]
            sent_claims = [t for t in marks["claim_sent"] if t >= notified]
            back = [t for t, n in marks["claim_back"] if n > 0]
            if sent_claims and back:
                parts.append((sent, returned, notified, sent_claims[0], back[0], started[i]))
            await asyncio.sleep(0.005)
    finally:
        stop.set()
        await daemon
    await asyncio.sleep(0.6)  # the statistics collector flushes every 500 ms
    server = {
        r["funcname"]: round(r["ms"], 3)
        for r in await producer.fetch(
            "SELECT funcname, total_time / calls AS ms FROM pg_stat_user_functions"
            " WHERE funcname IN ('claim_or_wait', 'create_sync_job') AND calls > 0"
        )
    }
    await producer.close()
    return {
        "server_ms_per_call": server,
        "chunks": len(parts),
        "enqueue_round_trip": _ms([p[1] - p[0] for p in parts]),
        "commit_to_notify_seen": _ms([p[2] - p[0] for p in parts]),
        "notify_to_claim_sent": _ms([p[3] - p[2] for p in parts]),
        "claim_round_trip": _ms([p[4] - p[3] for p in parts]),
        "claim_to_handler": _ms([p[5] - p[4] for p in parts]),
        "total": _ms([p[5] - p[0] for p in parts]),
    }


async def _sleep10(dsn: str, count: int) -> dict[str, Any]:
    conn = await connect(dsn)
    spans: list[tuple[float, float]] = []
    waits: list[float] = []
    done = asyncio.Event()

    async def handler(chunk: Chunk) -> None:
        begin = time.perf_counter()
        await asyncio.sleep(0.010)
        spans.append((begin, time.perf_counter()))
        if len(spans) == count:
            done.set()

    await chunkd_bench._enqueue(conn, count)
    await conn.execute("VACUUM ANALYZE")
    stop = asyncio.Event()
    settings = chunkd_bench.daemon_settings("sleep10", dsn)
    begin = time.perf_counter()
    daemon = asyncio.create_task(
        run_daemon(settings, HandlerRegistry(handlers={KIND: handler}), stop)
    )
    try:
        await done.wait()
    finally:
        stop.set()
        await daemon
        await conn.close()
    ran = [end - start for start, end in spans]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    ceiling = await _sleep_ceiling(settings.concurrency)
    handed = [t for t, _ in marks["handed"]]
    empty = sum(1 for _, ready in marks["handed"] if ready == 0)
    # Each handler start against the latest hand-over before it: the wait for a loop turn.
    for start, _ in spans:
        i = bisect.bisect_left(handed, start) - 1
        if i >= 0:
            waits.append(start - handed[i])
    return {
        "chunks": count,
        "per_second": round(count / (last - begin), 1),
        "sleep_10ms_took": _ms(ran),
        "hand_over_to_handler_start": _ms(waits),
        "hand_overs_with_nothing_ready": empty,
        "mean_handlers_running": round(sum(ran) / (last - first), 1),
        "concurrency": settings.concurrency,
        "loop_alone_per_second": ceiling,
    }


async def _sleep_ceiling(tasks: int, seconds: float = 3.0) -> float:
    """Sleeps of 10 ms per second that ``tasks`` tasks complete on this loop, nothing else."""
    done = 0
    end = time.perf_counter() + seconds

    async def sleeper() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await asyncio.sleep(0.010)
            done += 1

    await asyncio.gather(*(sleeper() for _ in range(tasks)))
    return round(done / seconds, 1)


THREE_INSERTS = """
WITH j AS (
    INSERT INTO chunkd.jobs (kind, payload, total_chunks) VALUES ($1, '{}', 1)
    RETURNING id, public_id, priority, kind
), c AS (
    INSERT INTO chunkd.chunks (job_id, seq, payload) SELECT j.id, 0, $2::jsonb FROM j
    RETURNING id, job_id, seq
), r AS (
    INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited)
    SELECT c.id, c.job_id, c.seq, j.priority, j.kind, false FROM c, j
)
SELECT public_id FROM j
"""


async def _statements(dsn: str, count: int) -> dict[str, Any]:
    conn = await connect(dsn)
    pool = await create_pool(dsn, size=1)
    default_reset = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    await conn.execute("CREATE TABLE public.notified (id bigserial PRIMARY KEY, p jsonb)")
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "select_1_direct": lambda: conn.fetchval("SELECT 1"),
        "select_1_chunkd_pool": lambda: pool.fetchval("SELECT 1"),
        "select_1_pool_with_asyncpg_reset": lambda: default_reset.fetchval("SELECT 1"),
        "insert_with_notify": lambda: conn.fetchval(
            "WITH x AS (INSERT INTO public.notified (p) VALUES ('[1]') RETURNING id)"
            " SELECT pg_notify('parts', x.id::text) FROM x"
        ),
        "three_enqueue_inserts": lambda: conn.fetchval(THREE_INSERTS, KIND, "1"),
        "create_sync_job": lambda: conn.fetchval(
            "SELECT chunkd.create_sync_job($1, $2::jsonb)", KIND, "[1]"
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for i in range(count + 50):  # interleaved; the first 50 warm up
            for name, call in calls.items():
                started = time.perf_counter()
                await call()
                if i >= 50:
                    times[name].append(time.perf_counter() - started)
            await asyncio.sleep(0.002)
    finally:
        await default_reset.close()
        await pool.close()
        await conn.close()
    return {"calls": count, **{name: _ms(values) for name, values in times.items()}}


async def main(args: argparse.Namespace) -> None:
    configure_logging("json", "info")
    _wrap_for_timing()
    cluster = PostgresCluster(fsync=True)
    cluster.start()
    try:
        admin = await connect(cluster.dsn("postgres"))
        await admin.execute("CREATE DATABASE parts")
        await admin.close()
        dsn = cluster.dsn("parts")
        conn = await connect(dsn)
        await apply_migrations(conn)
        await conn.close()
        if args.scenario == "latency":
            result = await _latency(dsn, args.chunks or 500)
        elif args.scenario == "sleep10":
            result = await _sleep10(dsn, args.chunks or 10_000)
        else:
            result = await _statements(dsn, args.chunks or 400)
        print(json.dumps({"scenario": args.scenario, **result}))
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["latency", "sleep10", "statements"], required=True)
    parser.add_argument("--chunks", type=int, default=0)
    uvloop.run(main(parser.parse_args()))
