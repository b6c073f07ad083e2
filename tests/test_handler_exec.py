"""The exec handler with real subprocesses (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
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
