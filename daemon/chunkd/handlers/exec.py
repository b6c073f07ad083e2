"""The ``exec:CMD`` handler: run a command per chunk, chunk JSON on stdin, result on stdout.

Exit status mapping (spec §4): 0 is done (stdout parsed as JSON, else kept as text, empty
is ``None``; a ``"$chunkd"`` key appends chunks, see :mod:`chunkd.handlers.reserved`), 75
(``EX_TEMPFAIL``, as in sysexits.h) is retryable, anything else, including death by a
signal, fails the chunk at once.

Each command runs in its own session and is read by :mod:`chunkd.handlers.process`: the
outcome follows the command's exit (what is left of its process group is killed then, and at
the daemon's per-chunk timeout), stdout is read up to the 1 MiB result limit (past it the chunk
fails and the command is stopped) and stderr kept as a rolling tail for the error excerpt, so a
command costs the daemon the same memory whatever it prints and a descendant holding its pipes
never holds the chunk. While the daemon traces, the command gets the chunk span's context in
its environment as ``TRACEPARENT`` (and ``TRACESTATE``); the ones the daemon inherited are
never passed on.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from decimal import Decimal
from typing import Any

from chunkd.chunk import MAX_RESULT_BYTES, Chunk, PermanentError, too_deep
from chunkd.handlers import HandlerError
from chunkd.handlers.process import StdoutLimitError, run_command
from chunkd.handlers.reserved import continuation_of
from chunkd.observability.tracing import propagation_headers

__all__ = ["EX_TEMPFAIL", "ExecHandler", "ExecRetryableError"]

#: sysexits.h "temporary failure; user is invited to retry".
EX_TEMPFAIL = 75

_STDERR_EXCERPT_CHARS = 500
# The bytes of stderr kept for the excerpt: 500 characters of up to 4 bytes, with room for
# the whitespace the excerpt strips.
_STDERR_TAIL_BYTES = 16 * 1024


class ExecRetryableError(RuntimeError):
    """The command asked to be retried (exit 75) or could not be started for a passing reason."""


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON and Postgres jsonb would refuse them when storing the result.
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_stdout(stdout: bytes, name: str) -> Any:
    text = stdout.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        # Decimal: the result is stored with every number exactly as printed.
        value = json.loads(text, parse_constant=_reject_constant, parse_float=Decimal)
    except ValueError:
        return text
    except RecursionError:
        # JSON, but too deep to read: kept as text it would change its type, and the same
        # command prints the same next time.
        raise PermanentError(f"{name!r} printed {too_deep('JSON')}") from None
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


# The environment as a trace context carrier (OpenTelemetry's convention). What the daemon
# inherited names the span of whoever started it, not the chunk's: never passed on.
_TRACE_ENV = ("TRACEPARENT", "TRACESTATE", "BAGGAGE")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV and k not in _TRACE_ENV}
    traced = propagation_headers()  # None unless the daemon traces
    if traced is not None:  # the chunk's span: TRACEPARENT, and TRACESTATE, BAGGAGE if any
        env.update((name.upper(), value) for name, value in traced.items())
    return env


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
            exited = await run_command(
                self.argv,
                stdin=stdin,
                env=_child_env(),
                stdout_limit=MAX_RESULT_BYTES,
                stderr_tail=_STDERR_TAIL_BYTES,
            )
        except FileNotFoundError:
            raise PermanentError(f"exec handler command not found: {self.name!r}") from None
        except PermissionError:
            raise PermanentError(f"exec handler command not executable: {self.name!r}") from None
        except OSError as exc:  # e.g. EAGAIN/EMFILE/ENOMEM: the machine is busy, not the chunk
            raise ExecRetryableError(f"cannot start {self.name!r}: {exc}") from None
        except StdoutLimitError:
            raise PermanentError(
                f"{self.name!r} wrote more than {MAX_RESULT_BYTES} bytes to stdout"
                " (the 1 MiB result limit); the command was stopped"
            ) from None

        code = exited.returncode
        if code == 0:
            return _parse_stdout(exited.stdout, self.name)
        excerpt = _stderr_excerpt(exited.stderr_tail)
        if code == EX_TEMPFAIL:
            raise ExecRetryableError(f"{self.name!r} exited {code} (EX_TEMPFAIL): {excerpt}")
        if code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = f"signal {-code}"
            raise PermanentError(f"{self.name!r} was killed by {signame}: {excerpt}")
        raise PermanentError(f"{self.name!r} exited {code}: {excerpt}")
