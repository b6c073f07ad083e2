"""``exec:`` handlers in a real ``chunkd run`` (on uvloop, as in production): what a command
prints cannot grow the daemon's memory, and what it leaves behind cannot hold its chunk."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from daemon_helpers import Daemon, wait_until
from sql_helpers import create_job, status_counts

FAST = ["--reap-interval", "500ms", "--retry-base", "100ms", "--retry-cap", "1s"]
# The daemon's memory may grow by this much at most while hundreds of MB pass its pipes: two
# chunks may each hold 1 MiB of stdout, the rest is read buffers and allocator slack. (Measured:
# under 2.5 MiB; reading the output whole it was 1,020 MiB for 2 x 250 MB of stderr.)
RSS_GROWTH_BOUND_KIB = 32 * 1024


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` line of /proc/PID/status (``VmRSS``: now, ``VmHWM``: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def run_and_measure(
    db: asyncpg.Connection, daemon: Daemon, kind: str, chunks: int
) -> tuple[Any, int, int]:
    """Enqueues ``chunks`` chunks of ``kind`` on a daemon that is ready (so its baseline is
    taken before any command runs); returns the job, the daemon's VmRSS then and its peak."""
    await daemon.wait_for_event("daemon.ready", timeout_s=30)
    baseline = status_kib(daemon.pid, "VmRSS")
    job = await create_job(db, chunks, kind=kind, max_attempts=1)

    async def terminal() -> bool:
        counts = await status_counts(db, job)
        return not counts.get("pending") and not counts.get("processing")

    await wait_until(terminal, timeout_s=90, what=f"the {kind} chunks to end")
    return job, baseline, status_kib(daemon.pid, "VmHWM")


async def errors_of(db: asyncpg.Connection, job: Any) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT status, error_message FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1",
        job,
    )
    return [(r["status"], r["error_message"]) for r in rows]


async def test_a_command_flooding_stderr_leaves_the_daemon_memory_flat(db, start) -> None:
    """The input of K14: 250 MB on stderr, then exit 1, at concurrency 2. The whole output was
    read, then cut to the excerpt: the daemon went from 42 MB to 1,213 MB."""
    command = "sh -c 'head -c 250000000 /dev/zero | tr \"\\0\" e >&2; exit 1'"
    daemon = start(
        "--handler", f"noisy=exec:{command}", "--concurrency", "2", "--chunk-timeout", "120s"
    )
    job, baseline, peak = await run_and_measure(db, daemon, "noisy", 2)
    assert peak - baseline < RSS_GROWTH_BOUND_KIB, f"VmRSS {baseline} kB, then VmHWM {peak} kB"
    error = "PermanentError: 'sh' exited 1: …" + "e" * 500  # the tail of stderr
    assert await errors_of(db, job) == [("failed", error)] * 2


async def test_a_command_flooding_stdout_is_stopped_at_the_result_limit(db, start) -> None:
    """300 MB on stdout, exit 0: the command is stopped once it passes 1 MiB and its chunk
    fails with one clear line, at once (not at the chunk timeout) and without the daemon
    holding the output."""
    command = "sh -c 'head -c 300000000 /dev/zero | tr \"\\0\" o; exit 0'"
    daemon = start(
        "--handler", f"loud=exec:{command}", "--concurrency", "2", "--chunk-timeout", "120s"
    )
    started = time.monotonic()
    job, baseline, peak = await run_and_measure(db, daemon, "loud", 2)
    error = (
        "PermanentError: 'sh' wrote more than 1048576 bytes to stdout (the 1 MiB result limit);"
        " the command was stopped"
    )
    assert peak - baseline < RSS_GROWTH_BOUND_KIB, f"VmRSS {baseline} kB, then VmHWM {peak} kB"
    assert await errors_of(db, job) == [("failed", error)] * 2
    assert time.monotonic() - started < 60


async def test_a_backgrounded_child_does_not_hold_the_chunk(db, start) -> None:
    """The input of K15: sh exits 0 at once, but under uvloop the backgrounded sleep held
    copies of the pipes, so the chunk waited for its timeout and failed after its attempts."""
    command = 'sh -c "sleep 30 </dev/null >/dev/null 2>&1 & echo {}"'
    daemon = start("--handler", f"bg=exec:{command}", "--chunk-timeout", "5s", *FAST)
    await daemon.wait_for_event("daemon.ready", timeout_s=30)
    job = await create_job(db, 2, kind="bg")
    await wait_until(
        lambda: _all_completed(db, job, 2), timeout_s=4, what="the chunks, before a timeout"
    )
    rows = await db.fetch(
        "SELECT result, attempts FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        job,
    )
    assert [(r["result"], r["attempts"]) for r in rows] == [({}, 1)] * 2


async def _all_completed(db: asyncpg.Connection, job: Any, n: int) -> bool:
    return await status_counts(db, job) == {"completed": n}


async def test_a_command_never_gets_the_daemons_inherited_trace_context(db, start) -> None:
    """A daemon started by a traced parent inherits TRACEPARENT (and TRACESTATE, BAGGAGE):
    those name the parent's span, not the chunk's. Tracing off (no span is current), a
    command gets none of them."""
    keys = ["TRACEPARENT", "TRACESTATE", "BAGGAGE"]
    show = f"import json, os; print(json.dumps([os.environ.get(k) for k in {keys!r}]))"
    inherited = {
        "TRACEPARENT": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "TRACESTATE": "vendor=inherited",
        "BAGGAGE": "user=inherited",
    }
    daemon = start("--handler", f'envk=exec:{sys.executable} -c "{show}"', env=inherited)
    await daemon.wait_for_event("daemon.ready", timeout_s=30)
    job = await create_job(db, 1, kind="envk")
    await wait_until(lambda: _all_completed(db, job, 1), timeout_s=15, what="the chunk")
    result = await db.fetchval(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", job
    )
    assert result == [None, None, None]
