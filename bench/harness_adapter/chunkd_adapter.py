"""chunkd's adapter for the long-horizon harness hardbyte/postgresql-job-queue-benchmarking.

One long-running process speaking the harness's adapter contract (its
CONTRIBUTING_ADAPTERS.md): environment in, JSON lines on stdout (a ``descriptor`` record at
start, then the ``adapter`` samples every ``SAMPLE_EVERY_S``), logs on stderr, exit 0 on
SIGTERM. chunkd is used as a user would, through its public surface only:

- ``chunkd migrate`` installs the schema;
- ``chunkd run --handler harness=chunkd_harness_handler:handle --concurrency WORKER_COUNT``
  is the worker: a child process, given SIGKILL by the kernel if this process dies (the
  harness's kill-worker phases kill this process: the daemon must die with it);
- the producer enqueues through the Python client, ``chunkd.create_sync_jobs`` (one
  statement per call), one one-chunk job per harness job: on each ``ENQUEUE n`` token the
  harness writes on stdin (``PRODUCER_PACING=harness``, its default), or paced here on wall
  clock elapsed time at ``PRODUCER_RATE`` (re-read from ``PRODUCER_RATE_CONTROL_FILE``)
  when ``PRODUCER_PACING=adapter``;
- ``queue_depth`` and ``running_depth`` are ``chunkd.queue_depth()``'s ``pending`` and
  ``processing``.

Pickup latency (enqueue call to handler start) comes back from the handler as datagrams
(chunkd_harness_handler.py); percentiles over the last 30 s from a bounded ring, as the
harness's own Python adapters keep them. Run by bench/harness_run.py; alone, see README.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

import chunkd

HERE = Path(__file__).resolve().parent
SYSTEM = "chunkd"
KIND = "harness"
WINDOW_S = 30.0
# A bulk insert that has not returned by then is given up (and its connection dropped).
ENQUEUE_TIMEOUT_S = 10.0
OBSERVER_METRICS = {"queue_depth", "running_depth", "producer_target_rate"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


INSTANCE = env_int("BENCH_INSTANCE_ID", 0)


def emit(record: dict[str, Any]) -> None:
    record.setdefault("instance_id", INSTANCE)
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    print(f"[chunkd-adapter] {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    values.sort()
    last = len(values) - 1
    return tuple(values[min(last, round(q * last))] for q in (0.50, 0.95, 0.99))  # type: ignore[return-value]


class Adapter:
    def __init__(self) -> None:
        self.dsn = os.environ["DATABASE_URL"]
        self.rate = env_int("PRODUCER_RATE", 800)
        self.target_rate = float(self.rate)
        self.pacing = os.environ.get("PRODUCER_PACING", "harness")
        self.batch_max = max(1, env_int("PRODUCER_BATCH_MAX", 128))
        self.batch_ms = max(1, env_int("PRODUCER_BATCH_MS", 25))
        self.workers = env_int("WORKER_COUNT", 32)
        self.sample_every = env_int("SAMPLE_EVERY_S", 5)
        self.padding = "x" * max(0, env_int("JOB_PAYLOAD_BYTES", 256) - 40)
        self.enqueued = 0
        self.completed = 0
        self.depth: dict[str, int] = {}
        self.latencies: collections.deque[tuple[float, float]] = collections.deque(maxlen=65536)
        self.stop = asyncio.Event()
        self.conn: asyncpg.Connection | None = None
        self.failures = 0

    # --- database --------------------------------------------------------------------

    async def _conn(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, timeout=5)
        return self.conn

    async def _drop_conn(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def enqueue(self, count: int) -> None:
        now_us = int(time.time() * 1e6)
        jobs = [
            {"kind": KIND, "chunks": [{"t_us": now_us, "pad": self.padding}]} for _ in range(count)
        ]
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT_S):
                await chunkd.create_sync_jobs(await self._conn(), jobs)
        except Exception as exc:  # whatever broke (the database, the link): drop the batch
            # Dropped, as the upstream adapters drop a failed insert: offered load is not
            # replayed. One line per burst of failures.
            if self.failures == 0:
                log(f"enqueue failed: {type(exc).__name__}: {exc}")
            self.failures += 1
            await self._drop_conn()
            await asyncio.sleep(0.1)
            return
        if self.failures:
            log(f"enqueue back after {self.failures} failed calls")
            self.failures = 0
        self.enqueued += count

    # --- producer --------------------------------------------------------------------

    async def tokens(self) -> None:
        """``ENQUEUE n`` lines from the harness's pacer, one bulk call each."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while not self.stop.is_set():
            line = await reader.readline()
            if not line:
                await self.stop.wait()  # the harness closed stdin; keep running until SIGTERM
                return
            parts = line.split()
            if len(parts) == 2 and parts[0] == b"ENQUEUE" and parts[1].isdigit():
                await self.enqueue(int(parts[1]))

    def _control_rate(self) -> float:
        path = os.environ.get("PRODUCER_RATE_CONTROL_FILE")
        if path:
            with contextlib.suppress(OSError, ValueError):
                return float(Path(path).read_text().strip())
        return float(self.rate)

    async def paced(self) -> None:
        """Credit on real elapsed time (the contract's normative pacing), batch_ms ticks."""
        credit, last = 0.0, time.monotonic()
        while not self.stop.is_set():
            await asyncio.sleep(max(0.0, self.batch_ms / 1000.0 - (time.monotonic() - last)))
            now = time.monotonic()
            self.target_rate = self._control_rate()
            credit += self.target_rate * (now - last)
            last = now
            while credit >= 1 and not self.stop.is_set():
                n = min(self.batch_max, int(credit))
                credit -= n
                await self.enqueue(n)

    # --- observation -----------------------------------------------------------------

    def on_report(self, sock: socket.socket) -> None:
        now = time.monotonic()
        while True:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                return
            self.completed += 1
            self.latencies.append((now, struct.unpack("d", data[:8])[0]))

    async def poll_depth(self) -> None:
        depth_conn: asyncpg.Connection | None = None
        while not self.stop.is_set():
            try:
                if depth_conn is None or depth_conn.is_closed():
                    depth_conn = await asyncpg.connect(self.dsn, timeout=5)
                rows = await depth_conn.fetch("SELECT status, chunks FROM chunkd.queue_depth()")
                self.depth = {r["status"]: int(r["chunks"]) for r in rows}
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if depth_conn is not None:
                    depth_conn.terminate()
                depth_conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)
        if depth_conn is not None:
            await depth_conn.close()

    async def sampler(self) -> None:
        period = self.sample_every
        tick = (math.floor(time.time() / period) + 1) * period  # clock-aligned ticks
        baseline = True  # the first tick starts the counts: every sample spans one period
        while not self.stop.is_set():
            while (delay := tick - time.time()) > 0 and not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                return
            tick += period
            now = time.monotonic()
            if baseline:
                baseline = False
                last_t, last_enq, last_cmp = now, self.enqueued, self.completed
                continue
            elapsed = max(1e-3, now - last_t)
            enq_rate = (self.enqueued - last_enq) / elapsed
            cmp_rate = (self.completed - last_cmp) / elapsed
            last_t, last_enq, last_cmp = now, self.enqueued, self.completed
            window = [ms for t, ms in self.latencies if t >= now - WINDOW_S]
            p50, p95, p99 = percentiles(window)
            stamp = now_iso()
            for metric, value, window_s in (
                ("claim_p50_ms", p50, WINDOW_S),
                ("claim_p95_ms", p95, WINDOW_S),
                ("claim_p99_ms", p99, WINDOW_S),
                ("enqueue_rate", enq_rate, float(period)),
                ("completion_rate", cmp_rate, float(period)),
                ("queue_depth", float(self.depth.get("pending", 0)), 0.0),
                ("running_depth", float(self.depth.get("processing", 0)), 0.0),
                ("producer_target_rate", self.target_rate, 0.0),
            ):
                if metric in OBSERVER_METRICS and INSTANCE != 0:
                    continue
                emit(
                    {
                        "t": stamp,
                        "system": SYSTEM,
                        "kind": "adapter",
                        "subject_kind": "adapter",
                        "subject": "",
                        "metric": metric,
                        "value": value,
                        "window_s": window_s,
                    }
                )

    # --- lifecycle -------------------------------------------------------------------

    async def descriptor(self) -> None:
        conn = await self._conn()
        tables = await conn.fetch(
            "SELECT schemaname || '.' || tablename AS t FROM pg_tables"
            " WHERE schemaname = 'chunkd' ORDER BY 1"
        )
        indexes = await conn.fetch(
            "SELECT schemaname || '.' || indexname AS i FROM pg_indexes"
            " WHERE schemaname = 'chunkd' ORDER BY 1"
        )
        emit(
            {
                "kind": "descriptor",
                "system": SYSTEM,
                "event_tables": [r["t"] for r in tables],
                "event_indexes": [r["i"] for r in indexes],
                "extensions": [],
                "version": os.environ.get("CHUNKD_HARNESS_REVISION") or chunkd.__version__,
                "schema_version": chunkd.__version__,
                "db_name": urlsplit(self.dsn).path.lstrip("/"),
                "started_at": now_iso(),
            }
        )

    def start_daemon(self, report_path: str) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            CHUNKD_DSN=self.dsn,
            CHUNKD_HARNESS_REPORT=report_path,
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        )
        level = os.environ.get("CHUNKD_HARNESS_LOG_LEVEL", "info")
        argv = [sys.executable, "-m", "chunkd.cli", "--log-format", "json", "--log-level", level]
        argv += ["run", "--handler", f"{KIND}=chunkd_harness_handler:handle"]
        argv += ["--concurrency", str(self.workers), "--shutdown-timeout", "4s"]
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,  # stdout is the harness's telemetry channel
            preexec_fn=_die_with_parent,
        )

    async def run(self) -> int:
        migrate = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "chunkd.cli", "--log-level", "warning", "migrate"),
            env=dict(os.environ, CHUNKD_DSN=self.dsn),
            stdout=sys.stderr,
        )
        if await migrate.wait() != 0:
            log(f"chunkd migrate exited {migrate.returncode}")
            return 1
        await self.descriptor()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        with tempfile.TemporaryDirectory(prefix="chunkd-harness-") as tmp:
            report_path = str(Path(tmp) / "report.sock")
            report = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            report.bind(report_path)
            report.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            report.setblocking(False)
            loop.add_reader(report.fileno(), self.on_report, report)
            daemon = self.start_daemon(report_path)
            producer = self.tokens() if self.pacing == "harness" else self.paced()
            tasks = [asyncio.create_task(c) for c in (producer, self.poll_depth(), self.sampler())]
            try:
                while not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), 0.5)
                    if self.stop.is_set():
                        break
                    if daemon.poll() is not None:
                        log(f"chunkd run exited {daemon.returncode}")
                        return 1
                    for task in tasks:
                        if task.done():  # none ends before the stop: a bug here, say so
                            log(f"adapter task ended: {task.exception()!r}")
                            return 1
            finally:
                self.stop.set()
                daemon.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(daemon.wait, 4.5)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._drop_conn()
                loop.remove_reader(report.fileno())
                report.close()
        log("stopped")
        return 0


def main() -> int:
    if os.environ.get("SCENARIO", "long_horizon") != "long_horizon":
        log(f"only SCENARIO=long_horizon is implemented, not {os.environ['SCENARIO']!r}")
        return 2
    import uvloop

    return uvloop.run(Adapter().run())


if __name__ == "__main__":
    sys.exit(main())
