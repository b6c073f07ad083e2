"""The ``exec:CMD`` handler: run a command per chunk, chunk JSON on stdin, result on stdout.

Exit status mapping (spec §4): 0 is done (stdout parsed as JSON, else kept as text, empty
is ``None``; a ``"$chunkd"`` key appends chunks, see :mod:`chunkd.handlers.reserved`), 75
(``EX_TEMPFAIL``, as in sysexits.h) is retryable, anything else, including death by a
signal, fails the chunk at once.

Each command runs in its own session, so when the daemon's per-chunk timeout cancels us we
can SIGKILL the whole process group: a ``sh -c`` wrapper's children would otherwise outlive
the chunk and keep working on data that is about to be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
from decimal import Decimal
from typing import Any

from chunkd.chunk import Chunk, PermanentError
from chunkd.handlers import HandlerError
from chunkd.handlers.reserved import continuation_of

__all__ = ["EX_TEMPFAIL", "ExecHandler", "ExecRetryableError"]

#: sysexits.h "temporary failure; user is invited to retry".
EX_TEMPFAIL = 75

_STDERR_EXCERPT_CHARS = 500
# After SIGKILL the pipes close at once, unless a process escaped the group (setsid) while
# holding them; never hang a cancellation on such a straggler.
_REAP_TIMEOUT_S = 5.0


class ExecRetryableError(RuntimeError):
    """The command asked to be retried (exit 75) or could not be started for a passing reason."""


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON and Postgres jsonb would refuse them when storing the result.
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_stdout(stdout: bytes) -> Any:
    text = stdout.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        # Decimal: the result is stored with every number exactly as printed.
        value = json.loads(text, parse_constant=_reject_constant, parse_float=Decimal)
    except ValueError:
        return text
    return continuation_of(value)


def _stderr_excerpt(stderr: bytes) -> str:
    """The tail of stderr: the actual error is usually the last thing a program prints."""
    text = stderr.decode("utf-8", errors="replace").strip()
    if not text:
        return "(no stderr)"
    if len(text) > _STDERR_EXCERPT_CHARS:
        text = "…" + text[-_STDERR_EXCERPT_CHARS:]
    return text


# The daemon's own secrets: a handler command gets the environment without them.
_SECRET_ENV = (
    "CHUNKD_DSN",
    "DATABASE_URL",
    "CHUNKD_HTTP_HEADERS",
    "CHUNKD_HTTP_HEADER",
    "PGPASSWORD",
)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}


def _kill_group(pgid: int) -> None:
    # The group may already be gone (or, if its id was reused, not ours to signal).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _feed_stdin(proc: asyncio.subprocess.Process, data: bytes) -> None:
    """Writes the chunk to the child's stdin and closes it. A child that exits without reading
    it all (``env``, ``true``) is not an error: asyncio's ``communicate`` ignores the
    BrokenPipeError it then gets, but uvloop raises RuntimeError for a write to a pipe it has
    already closed after the child's exit, which would fail the chunk."""
    writer = proc.stdin
    assert writer is not None  # started with stdin=PIPE
    try:
        writer.write(data)
        await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except RuntimeError:
        if not writer.is_closing():
            raise
    finally:
        writer.close()


class ExecHandler:
    """Runs ``command`` (split with :func:`shlex.split`, no shell) once per chunk."""

    def __init__(self, command: str) -> None:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            # Not echoed: arguments may hold secrets, and the error goes to the logs.
            raise HandlerError(f"exec handler command cannot be parsed: {exc}") from None
        if not argv:
            raise HandlerError("exec handler needs a command, got an empty one")
        self.command = command
        self.argv = tuple(argv)
        # Only the program name goes into error messages: arguments may hold secrets.
        self.name = argv[0]

    def __repr__(self) -> str:
        return f"ExecHandler({self.name!r})"

    async def __call__(self, chunk: Chunk) -> Any:
        """Run the command for one chunk; return its result or raise to steer the retry."""
        try:
            # The payloads exactly as stored: numbers are never re-encoded.
            stdin = chunk.to_json().encode()
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"chunk is not JSON-serialisable: {exc}") from None
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=_child_env(),
            )
        except FileNotFoundError:
            raise PermanentError(f"exec handler command not found: {self.name!r}") from None
        except PermissionError:
            raise PermanentError(f"exec handler command not executable: {self.name!r}") from None
        except OSError as exc:  # e.g. EAGAIN/EMFILE/ENOMEM: the machine is busy, not the chunk
            raise ExecRetryableError(f"cannot start {self.name!r}: {exc}") from None

        feeding = asyncio.ensure_future(_feed_stdin(proc, stdin))
        try:
            stdout, stderr = await proc.communicate()  # reads both pipes, waits for the exit
            await feeding
        except BaseException:
            # Cancellation (the daemon's timeout) or anything unexpected: leave nothing behind.
            feeding.cancel()
            _kill_group(proc.pid)
            await self._reap(proc)
            raise

        code = proc.returncode
        assert code is not None  # communicate() waits for the exit
        if code == 0:
            return _parse_stdout(stdout)
        excerpt = _stderr_excerpt(stderr)
        if code == EX_TEMPFAIL:
            raise ExecRetryableError(f"{self.name!r} exited {code} (EX_TEMPFAIL): {excerpt}")
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            raise PermanentError(f"{self.name!r} was killed by {signame}: {excerpt}")
        raise PermanentError(f"{self.name!r} exited {code}: {excerpt}")

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for the killed child so no zombie or open pipe transport is left behind.

        Shielded so that a second cancellation cannot interrupt the reaping itself, and
        bounded so that a straggler holding our pipes cannot block the caller forever.
        """
        waiter = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), _REAP_TIMEOUT_S)
        except TimeoutError:
            waiter.cancel()
            # The child is dead but something outside its group still holds the pipes:
            # close our ends so the transport does not leak (asyncio has no public hook).
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
