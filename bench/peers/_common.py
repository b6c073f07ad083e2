"""Plumbing shared by the peer runners: CLI, hard timeout, one-JSON-object output, stats.

Stdlib only (uvloop when installed), so it runs in the separate peer venv. The chunkd
side never imports any of this: it runs a runner as a subprocess and reads exactly one
JSON object from its stdout, which is why everything else a run prints goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RATE = 200.0
DEFAULT_DURATION_S = 10.0
SETTINGS_CHOICES = ("best", "default")
# Grace for a cancelled run to stop its worker before the watchdog thread gives up on it.
WATCHDOG_GRACE_S = 30.0
# Poll interval for the final "is it durably done" check; only used once the in-process
# counter says every handler has run, so it never competes with the jobs themselves.
DONE_POLL_S = 0.005
# How long a worker gets to stop cleanly after the measurement; not part of the timing.
STOP_TIMEOUT_S = 30.0
# Same three facts from every contender, so a table row shows what the server did.
SERVER_INFO_SQL = (
    "SELECT current_setting('server_version') AS server_version,"
    " current_setting('fsync') AS fsync,"
    " current_setting('synchronous_commit') AS synchronous_commit"
)

Result = dict[str, Any]


@dataclass(frozen=True)
class Options:
    """One run's parameters, as given on the command line (defaults resolved)."""

    contender: str
    dsn: str
    scenario: str
    jobs: int
    settings: str
    rate: float
    duration: float
    timeout: float


Runner = Callable[[Options], Coroutine[Any, Any, Result]]


class RunTimeout(Exception):
    """The run exceeded --timeout; reported as a JSON error with a non-zero exit."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class _JsonArgumentParser(argparse.ArgumentParser):
    """Usage errors still print one JSON object, so a harness never has to parse stderr."""

    contender: str = ""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _write_json(sys.stdout, {"contender": self.contender, "error": f"usage: {message}"})
        sys.exit(2)


def parse_options(
    contender: str, default_jobs: Mapping[str, int], argv: list[str] | None = None
) -> Options:
    """Parse the common CLI; the latency scenario's job count is rate x duration."""
    parser = _JsonArgumentParser(
        prog=f"{contender}_bench.py",
        description=f"Benchmark {contender}; prints one JSON object on stdout.",
    )
    parser.contender = contender
    parser.add_argument("--dsn", required=True, help="libpq URI of a fresh, empty database")
    parser.add_argument("--scenario", required=True, choices=sorted(default_jobs))
    parser.add_argument("--jobs", type=_positive_int, help="job count (not for latency)")
    parser.add_argument("--settings", choices=SETTINGS_CHOICES, default="best")
    parser.add_argument("--rate", type=_positive_float, default=DEFAULT_RATE, help="jobs/s")
    parser.add_argument("--duration", type=_positive_float, default=DEFAULT_DURATION_S)
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    if args.scenario == "latency":
        jobs = max(1, round(args.rate * args.duration))
    else:
        jobs = args.jobs or default_jobs[args.scenario]
    return Options(
        contender=contender,
        dsn=args.dsn,
        scenario=args.scenario,
        jobs=jobs,
        settings=args.settings,
        rate=args.rate,
        duration=args.duration,
        timeout=args.timeout,
    )


def event_loop_name() -> str:
    """uvloop when installed: chunkd itself runs on uvloop, so peers get the same loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def base_fields(opts: Options) -> Result:
    """Fields every output object starts with, success or error."""
    return {"contender": opts.contender, "scenario": opts.scenario}


def throughput_result(
    opts: Options, settings: Mapping[str, Any], seconds: float, **extra: Any
) -> Result:
    """The throughput scenarios' result: N jobs in `seconds` of wall time."""
    return {
        **base_fields(opts),
        "settings": dict(settings),
        "jobs": opts.jobs,
        "seconds": round(seconds, 4),
        "per_second": round(opts.jobs / seconds, 1) if seconds > 0 else None,
        **extra,
    }


def runtime_info(versions: Mapping[str, str]) -> Result:
    """Client-side versions, so a table row can say exactly what was measured."""
    return {
        "versions": {"python": platform.python_version(), **versions},
        "event_loop": event_loop_name(),
    }


def _write_json(stream: TextIO, payload: Result) -> None:
    stream.write(json.dumps(payload, sort_keys=False) + "\n")
    stream.flush()


def _start_watchdog(opts: Options, stdout: TextIO) -> threading.Timer:
    """Last resort if a cancelled run wedges: print the JSON error and hard-exit."""

    def fire() -> None:
        payload = {
            **base_fields(opts),
            "error": f"timeout: run exceeded {opts.timeout}s and did not stop in "
            f"{WATCHDOG_GRACE_S}s",
        }
        _write_json(stdout, payload)
        os._exit(3)

    timer = threading.Timer(opts.timeout + WATCHDOG_GRACE_S, fire)
    timer.daemon = True
    timer.start()
    return timer


async def _bounded(runner: Runner, opts: Options) -> Result:
    """Cancel the run at --timeout; a TimeoutError from inside the run stays an error."""
    scope = asyncio.timeout(opts.timeout)
    try:
        async with scope:
            return await runner(opts)
    except TimeoutError as exc:
        if scope.expired():
            raise RunTimeout(f"timeout: run exceeded {opts.timeout}s") from exc
        raise


def host_info() -> Result:
    """CPU count and load before the run: the figures mean little on a busy machine."""
    return {"cpus": os.cpu_count(), "loadavg_1m_before": round(os.getloadavg()[0], 2)}


def main(contender: str, default_jobs: Mapping[str, int], runner: Runner) -> int:
    """Run one benchmark and print exactly one JSON object; 0 ok, 1 error, 3 timeout."""
    opts = parse_options(contender, default_jobs)
    stdout = sys.stdout
    watchdog = _start_watchdog(opts, stdout)
    host = host_info()
    try:
        # Peer libraries may log to stdout; keep stdout for the single result object.
        with (
            contextlib.redirect_stdout(sys.stderr),
            asyncio.Runner(loop_factory=_loop_factory()) as loop_runner,
        ):
            payload = {**loop_runner.run(_bounded(runner, opts)), "host": host}
        code = 0
    except RunTimeout as exc:
        payload, code = {**base_fields(opts), "error": str(exc)}, 3
    except Exception as exc:
        payload, code = {**base_fields(opts), "error": f"{type(exc).__name__}: {exc}"}, 1
    finally:
        watchdog.cancel()
    _write_json(stdout, payload)
    return code


@dataclass
class Counter:
    """Counts finished handlers in-process; wakes the runner once `target` is reached.

    Lets the runner wait without polling the database while jobs are still flowing;
    the database is only asked at the very end to confirm the work is durably recorded.
    """

    target: int
    count: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def tick(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


async def until_set_or_worker_exit(event: asyncio.Event, worker: asyncio.Future[Any]) -> None:
    """Wait for `event`, but fail fast if the worker task ends first (it crashed)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, worker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not event.is_set():
        if worker.done() and not worker.cancelled() and worker.exception() is not None:
            raise RuntimeError(f"worker failed: {worker.exception()!r}")
        raise RuntimeError("worker stopped before all jobs were handled")


async def wait_for_db(check: Callable[[], Awaitable[bool]], interval: float = DONE_POLL_S) -> None:
    """Poll `check` until true; the overall --timeout bounds how long this may take."""
    while True:
        if await check():
            return
        await asyncio.sleep(interval)


async def paced(rate: float, count: int) -> AsyncIterator[int]:
    """Yield 0..count-1 on an absolute schedule start + i/rate.

    Absolute, not sleep(1/rate) per step, so the cost of each enqueue does not drift the
    rate down; if an enqueue is late, the next ones go immediately until back on time.
    """
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, no interpolation."""
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LatencyProbe:
    """Enqueue-to-handler-start latency for jobs 0..count-1, one process, one loop.

    Both timestamps are time.perf_counter() in the same process, so no clock sync issue:
    `sent` is taken right before the enqueue call, `started` first thing in the handler.
    """

    count: int
    sent: list[float] = field(init=False)
    started: list[float] = field(init=False)
    counter: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.sent = [math.nan] * self.count
        self.started = [math.nan] * self.count
        self.counter = Counter(self.count)

    def mark_sent(self, index: int) -> None:
        self.sent[index] = time.perf_counter()

    def mark_started(self, index: int) -> None:
        now = time.perf_counter()
        if 0 <= index < self.count and math.isnan(self.started[index]):
            self.started[index] = now
            self.counter.tick()

    def summary(self) -> Result:
        """p50/p99/max in ms over the jobs that started; `missing` counts the rest."""
        lat = sorted(
            (s - e) * 1000.0
            for e, s in zip(self.sent, self.started, strict=True)
            if not (math.isnan(e) or math.isnan(s))
        )
        if not lat:
            return {"count": 0, "missing": self.count}
        return {
            "count": len(lat),
            "missing": self.count - len(lat),
            "p50_ms": round(percentile(lat, 50), 3),
            "p99_ms": round(percentile(lat, 99), 3),
            "max_ms": round(lat[-1], 3),
            "mean_ms": round(sum(lat) / len(lat), 3),
        }


async def produce_paced(
    probe: LatencyProbe, rate: float, enqueue: Callable[[int], Awaitable[object]]
) -> float:
    """Enqueue probe.count jobs one at a time at `rate`; returns the seconds it took."""
    start = time.perf_counter()
    async for i in paced(rate, probe.count):
        probe.mark_sent(i)
        await enqueue(i)
    return time.perf_counter() - start


def latency_result(
    opts: Options,
    settings: Mapping[str, Any],
    probe: LatencyProbe,
    enqueue_seconds: float,
    **extra: Any,
) -> Result:
    """The latency scenario's result: percentiles plus the rate actually achieved."""
    achieved = (probe.count - 1) / enqueue_seconds if enqueue_seconds > 0 else None
    return {
        **base_fields(opts),
        "settings": dict(settings),
        "jobs": probe.count,
        "seconds": round(enqueue_seconds, 4),
        "per_second": round(achieved, 1) if achieved else None,
        "rate": opts.rate,
        "duration": opts.duration,
        "timing": "one process, one asyncio loop, time.perf_counter() on both sides",
        **probe.summary(),
        **extra,
    }
