"""The exec handler with real subprocesses (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from chunkd import Chunk, PermanentError, RetryLater
from chunkd.handlers import HandlerError
from chunkd.handlers.exec import ExecHandler, ExecRetryableError


def make_chunk() -> Chunk:
    return Chunk(
        queue_id=uuid4(),
        chunk_id=uuid4(),
        sync_job_id=uuid4(),
        seq=4,
        attempt=2,
        kind="k",
        payload={"mailbox": "a@example.com", "page": 2},
        job_payload={"tenant": "t1"},
    )


def python(script: str) -> ExecHandler:
    """A handler running ``script`` with this interpreter, quoted as a user would."""
    return ExecHandler(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}")


async def test_json_stdout_is_the_result() -> None:
    handler = python("import json; print(json.dumps({'ok': True, 'n': [1, 2]}))")
    assert await handler(make_chunk()) == {"ok": True, "n": [1, 2]}


async def test_text_stdout_is_stripped_text() -> None:
    assert await python("print('  done, 3 rows  ')")(make_chunk()) == "done, 3 rows"


async def test_empty_stdout_is_none() -> None:
    assert await python("pass")(make_chunk()) is None


async def test_chunk_json_arrives_on_stdin() -> None:
    chunk = make_chunk()
    handler = python("import sys; sys.stdout.write(sys.stdin.read())")
    assert await handler(chunk) == chunk.to_json_dict()


async def test_exit_75_is_retryable() -> None:
    handler = python("import sys; sys.stderr.write('mailbox busy'); sys.exit(75)")
    with pytest.raises(ExecRetryableError, match="mailbox busy") as info:
        await handler(make_chunk())
    assert not isinstance(info.value, PermanentError | RetryLater)


async def test_other_exit_is_permanent_with_stderr_excerpt() -> None:
    handler = python("import sys; sys.stderr.write('x' * 2000 + 'bad payload'); sys.exit(3)")
    with pytest.raises(PermanentError) as info:
        await handler(make_chunk())
    message = str(info.value)
    assert "exited 3" in message
    assert message.endswith("bad payload")  # the tail is kept: that is where errors are
    assert len(message) < 700


async def test_death_by_signal_is_permanent() -> None:
    handler = python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    with pytest.raises(PermanentError, match="SIGTERM"):
        await handler(make_chunk())


async def test_missing_command_is_permanent() -> None:
    handler = ExecHandler(f"/nonexistent/chunkd-test-{uuid4().hex} --flag")
    with pytest.raises(PermanentError, match="not found"):
        await handler(make_chunk())


def test_command_is_validated_at_construction() -> None:
    for bad in ("", "   ", "'unbalanced"):
        with pytest.raises(ValueError):
            ExecHandler(bad)
    assert issubclass(HandlerError, ValueError)
    assert ExecHandler("tool --token=abc 'two words'").argv == ("tool", "--token=abc", "two words")
    assert "abc" not in repr(ExecHandler("tool --token=abc"))


def _exists(pid: int) -> bool:
    """Alive, not counting a zombie: in a container, PID 1 may never reap the orphan."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # sh stays the group leader and waits; sleep is the grandchild that must not survive.
    script = f"sleep 30 & echo $! > {shlex.quote(str(pid_file))}; wait"
    handler = ExecHandler(f"sh -c {shlex.quote(script)}")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handler(make_chunk()), 0.5)

    grandchild = int(pid_file.read_text())
    for _ in range(100):  # up to 2 s: SIGKILL delivery is asynchronous
        if not _exists(grandchild):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the grandchild outlived the cancelled handler")


async def test_cancellation_is_propagated() -> None:
    task = asyncio.create_task(python("import time; time.sleep(30)")(make_chunk()))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_concurrent_runs() -> None:
    handler = python("import json, sys; print(json.load(sys.stdin)['seq'])")
    results = await asyncio.gather(*(handler(make_chunk()) for _ in range(10)))
    assert results == [4] * 10
    assert json.dumps(results)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_command_that_never_reads_its_stdin_succeeds(loop: str) -> None:
    """``exec:env`` and the like exit without reading the chunk: a stdin we cannot finish
    writing is not the chunk's failure. (Under uvloop a write to the closed pipe raised
    RuntimeError, not BrokenPipeError, and failed the chunk now and then.)"""
    import uvloop

    handler = ExecHandler("true")
    big = Chunk(
        queue_id=uuid4(), chunk_id=uuid4(), sync_job_id=uuid4(), seq=0, attempt=1, kind="k",
        payload={"blob": "x" * 1_000_000}, job_payload={},
    )  # fmt: skip

    async def runs() -> list[Any]:
        # Concurrent, so a child has often exited before its stdin is written to.
        return list(await asyncio.gather(*(handler(c) for c in [big, make_chunk()] * 20)))

    results = uvloop.run(runs()) if loop == "uvloop" else asyncio.run(runs())
    assert results == [None] * 40


# Output and completion (issue 21, K14 and K15): each runs on the daemon's loop (uvloop) and on
# asyncio's own, in a fresh loop of its own.
LOOPS = ["uvloop", "asyncio"]


def run_on(loop: str, coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


def sh(script: str) -> ExecHandler:
    return ExecHandler(f"sh -c {shlex.quote(script)}")


async def timed(handler: ExecHandler, limit_s: float = 10.0) -> tuple[Any, float]:
    """The handler's result (or exception) and its seconds; fails past ``limit_s``."""
    started = time.monotonic()
    try:
        result: Any = await asyncio.wait_for(handler(make_chunk()), limit_s)
    except (PermanentError, ExecRetryableError) as exc:
        result = exc
    return result, time.monotonic() - started


async def gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while _exists(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.parametrize("loop", LOOPS)
def test_a_background_child_with_redirected_output_does_not_hold_the_chunk(loop: str) -> None:
    """The input of K15: sh exits 0 at once. Under uvloop the backgrounded sleep still held
    copies of the pipes (libuv leaves the child's socketpair ends open past fd 2), and the
    chunk waited for EOF until its timeout."""
    handler = ExecHandler('sh -c "sleep 30 </dev/null >/dev/null 2>&1 & echo {}"')
    result, seconds = run_on(loop, timed(handler))
    assert result == {}
    assert seconds < 5


@pytest.mark.parametrize("loop", LOOPS)
def test_a_background_child_holding_the_pipes_is_killed_when_the_command_exits(
    loop: str, tmp_path: Path
) -> None:
    """The sleep really keeps stdout and stderr open: the outcome follows sh's exit, and what
    is left of the command's process group is killed then (docs/handlers.md)."""
    pid_file = tmp_path / "sleep.pid"
    handler = sh(f"sleep 30 & echo $! > {shlex.quote(str(pid_file))}; echo '{{\"n\": 1}}'")

    async def runs() -> tuple[Any, float, bool]:
        result, seconds = await timed(handler)
        return result, seconds, await gone(int(pid_file.read_text()))

    result, seconds, sleep_gone = run_on(loop, runs())
    assert result == {"n": 1}
    assert seconds < 5
    assert sleep_gone, "the left-behind sleep outlived its chunk"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_command_with_a_background_child_fails_at_its_exit(loop: str) -> None:
    handler = sh("sleep 30 & echo 'bad payload' >&2; exit 75")
    result, seconds = run_on(loop, timed(handler))
    assert isinstance(result, ExecRetryableError)
    assert str(result) == "'sh' exited 75 (EX_TEMPFAIL): bad payload"
    assert seconds < 5


@pytest.mark.parametrize("loop", LOOPS)
def test_a_process_that_left_the_group_holding_the_pipes_waits_only_the_grace(
    loop: str, tmp_path: Path
) -> None:
    """A descendant in a session of its own is out of reach of the group kill and keeps the
    pipes open: what the command printed before its exit is still read whole, and the chunk
    ends within the grace period, not with the descendant."""
    pid_file = tmp_path / "escaped.pid"
    script = (
        "import json, subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print(json.dumps({'x': 'y' * 300000}))\n"
    )
    try:
        result, seconds = run_on(loop, timed(python(script)))
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert result == {"x": "y" * 300000}
    assert seconds < 5


@pytest.mark.parametrize("loop", LOOPS)
def test_stdout_above_the_result_limit_fails_the_chunk_and_stops_the_command(loop: str) -> None:
    """2 MiB at once, then the command would run for 30 s: it is killed as soon as the limit
    is passed, and the chunk fails with one clear line."""
    handler = python("import sys, time; sys.stdout.write('x' * 2097152); time.sleep(30)")
    result, seconds = run_on(loop, timed(handler))
    assert isinstance(result, PermanentError)
    assert str(result) == (
        f"{sys.executable!r} wrote more than 1048576 bytes to stdout (the 1 MiB result limit); "
        "the command was stopped"
    )
    assert seconds < 5


@pytest.mark.parametrize("loop", LOOPS)
def test_stdout_up_to_the_limit_is_the_result(loop: str) -> None:
    size = 1024 * 1024 - 2  # the two quotes make it exactly 1 MiB
    handler = python(f"import sys; sys.stdout.write('\"' + 'z' * {size} + '\"')")
    result, _ = run_on(loop, timed(handler))
    assert result == "z" * size


@pytest.mark.parametrize("loop", LOOPS)
def test_stderr_is_read_as_a_rolling_tail_in_bounded_memory(loop: str) -> None:
    """100 MB on stderr, then the real error: the excerpt is its tail, and the handler never
    holds more than a small part of it (tracemalloc counts every bytes object Python makes)."""
    handler = sh("head -c 100000000 /dev/zero | tr '\\0' e >&2; echo 'the real error' >&2; exit 1")

    async def runs() -> tuple[Any, int]:
        tracemalloc.start()
        try:
            result, _ = await timed(handler, 60)
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    result, peak = run_on(loop, runs())
    assert isinstance(result, PermanentError)
    message = str(result)
    assert message.startswith("'sh' exited 1: …eeee")
    assert message.endswith("the real error")
    assert len(message) < 700
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes traced"


@pytest.mark.parametrize("loop", LOOPS)
def test_output_already_in_the_pipes_survives_a_stalled_event_loop(
    loop: str, tmp_path: Path
) -> None:
    """The event loop stalls (blocking code elsewhere in the daemon) across the end of the
    grace period while output written within it waits in the pipe: it is still read, the
    grace is not cut short by the timer that expired meanwhile."""
    pid_file, escaped_pid_file = tmp_path / "command.pid", tmp_path / "escaped.pid"
    escaped = f'echo $$ > {escaped_pid_file}; sleep 0.15; printf " tail"; exec sleep 30'
    script = (
        "import os, subprocess, sys\n"
        f"subprocess.Popen(['sh', '-c', {escaped!r}], start_new_session=True)\n"
        "sys.stdout.write('head')\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    )

    async def stall_after_the_exit() -> None:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the command did not start"
            await asyncio.sleep(0.002)
        command = int(pid_file.read_text())
        while _exists(command):
            assert time.monotonic() < deadline, "the command did not exit"
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)  # the handler sees the exit and starts its grace period
        time.sleep(0.6)  # noqa: ASYNC251 - the loop stalls past the grace period's end

    async def runs() -> Any:
        staller = asyncio.ensure_future(stall_after_the_exit())
        result, _ = await timed(python(script))
        await staller
        return result

    try:
        result = run_on(loop, runs())
    finally:
        if escaped_pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(escaped_pid_file.read_text()), signal.SIGKILL)
    assert result == "head tail"
