"""Running one command to its exit with bounded output: the engine of the ``exec:`` handler.

Two rules keep what a command costs the daemon independent of what the command does:

* Output is taken as it arrives, never gathered whole: stdout up to a limit (past it the
  command's process group is killed and :class:`StdoutLimitError` raised), stderr as a rolling
  tail of its last bytes. Nothing is left blocked on a full pipe: both are always drained.
* The run ends with the command's own exit, not with the end of its pipes. Descendants may hold
  copies of them: a child sent to the background, or under uvloop any grandchild at all, since
  uvloop leaves the child's ends of its socketpairs open in the child past fd 2 (even
  ``sleep 30 </dev/null >/dev/null 2>&1 &`` holds them). At the exit, what is left of the
  command's process group is killed and the pipes are read until their end, for at most
  :data:`EXIT_GRACE_S` more; a process that left the group (``setsid``) cannot hold a run
  longer than that.

The command runs in a session of its own, so its process group is its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

__all__ = ["EXIT_GRACE_S", "Exited", "StdoutLimitError", "run_command"]

#: Seconds the pipes are still read after the command's exit, waiting for their end.
EXIT_GRACE_S = 0.25
# After SIGKILL the command exits at once; never hang a cancellation on it regardless.
_REAP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Exited:
    """A finished command: its exit status (negative: killed by that signal), its whole stdout
    (at most the limit) and the last bytes of its stderr (at most the tail's size)."""

    returncode: int
    stdout: bytes
    stderr_tail: bytes


class StdoutLimitError(Exception):
    """The command wrote more than the limit to stdout; it was killed, its process group too."""


class _Collector(asyncio.SubprocessProtocol):
    """Takes the command's output as the event loop reads it, within fixed bounds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stdout_limit: int, stderr_tail: int):
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.over_limit: asyncio.Future[None] = loop.create_future()
        self.ended = {1: loop.create_future(), 2: loop.create_future()}  # EOF of stdout, stderr
        self._stdout_limit = stdout_limit
        self._stderr_tail = stderr_tail

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 1:
            if self.over_limit.done():
                return  # the command is being killed; what it wrote meanwhile is dropped
            if len(self.stdout) + len(data) > self._stdout_limit:
                self.over_limit.set_result(None)
                return
            self.stdout += data
        elif fd == 2:
            self.stderr += data
            excess = len(self.stderr) - self._stderr_tail
            if excess > 0:
                del self.stderr[:excess]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        ended = self.ended.get(fd)
        if ended is not None and not ended.done():
            ended.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _kill_group(pgid: int) -> None:
    # The group may be gone already (or, if its id was reused, not ours to signal).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _feed_stdin(transport: asyncio.SubprocessTransport, data: bytes) -> None:
    """Hands ``data`` to the command's stdin, closed once written. A command that exits
    without reading it all (``env``, ``true``) is fine: the rest is unread input. asyncio
    drops a write to a pipe closed by the child; uvloop raises RuntimeError for it."""
    pipe = cast("asyncio.WriteTransport | None", transport.get_pipe_transport(0))
    if pipe is None or pipe.is_closing():
        return
    try:
        pipe.write(data)
        pipe.close()  # after the buffered data is written
    except (BrokenPipeError, ConnectionResetError):
        pass
    except RuntimeError:
        if not pipe.is_closing():
            raise


async def _read_to_the_end(collector: _Collector) -> None:
    """After the exit: reads the pipes until both end, for at most EXIT_GRACE_S. (A stalled
    event loop loses nothing here: asyncio and uvloop both read the pipes that are ready
    before they act on the expired timer.)"""
    open_pipes = [ended for ended in collector.ended.values() if not ended.done()]
    if open_pipes:
        await asyncio.wait(open_pipes, timeout=EXIT_GRACE_S)


async def _reap(collector: _Collector) -> None:
    """Waits, bounded, for the exit of a command just killed."""
    await asyncio.wait([collector.exited], timeout=_REAP_TIMEOUT_S)


async def run_command(
    argv: Sequence[str],
    *,
    stdin: bytes,
    env: dict[str, str],
    stdout_limit: int,
    stderr_tail: int,
) -> Exited:
    """Runs ``argv`` (no shell) in a new session with ``stdin`` on its stdin; returns when it
    has exited, having killed what was left of its process group.

    ``stdout_limit`` and ``stderr_tail`` are bytes. Raises :class:`StdoutLimitError` when
    stdout passes the limit, and the :class:`OSError` of a command that cannot be started
    (:class:`FileNotFoundError`, :class:`PermissionError`, ...). On cancellation (the chunk's
    timeout) the process group is killed before the cancellation propagates.
    """
    loop = asyncio.get_running_loop()
    transport, collector = await loop.subprocess_exec(
        lambda: _Collector(loop, stdout_limit, stderr_tail),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    pgid = transport.get_pid()
    try:
        try:
            _feed_stdin(transport, stdin)
            await asyncio.wait(
                [collector.exited, collector.over_limit], return_when=asyncio.FIRST_COMPLETED
            )
            if collector.over_limit.done():
                raise StdoutLimitError(f"more than {stdout_limit} bytes on stdout")
        except BaseException:
            # Cancellation, the limit, or anything unexpected: leave nothing running.
            _kill_group(pgid)
            await _reap(collector)
            raise
        # The command has exited: what it left in its group is stopped with it. (The group's id
        # stays taken while a member lives; once none does, killpg finds no one.)
        _kill_group(pgid)
        await _read_to_the_end(collector)
        returncode = transport.get_returncode()
        assert returncode is not None  # process_exited has been called
        return Exited(returncode, bytes(collector.stdout), bytes(collector.stderr))
    finally:
        # Our ends of the pipes, even where an escaped process still holds the other end, and
        # stdin's unwritten rest dropped (a plain close would wait for a reader to take it).
        stdin_pipe = cast("asyncio.WriteTransport | None", transport.get_pipe_transport(0))
        if stdin_pipe is not None and (
            not stdin_pipe.is_closing() or stdin_pipe.get_write_buffer_size()
        ):
            stdin_pipe.abort()
        transport.close()
