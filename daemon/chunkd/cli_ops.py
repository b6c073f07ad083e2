"""The operator commands: enqueue, status, retry, cancel, reap, purge, workers.

Thin wrappers: the queries live in ``chunkd.ops``, the drawing in ``chunkd.status_view``;
``cli.py`` adds them to the ``chunkd`` group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from chunkd.cli_options import DURATION, dsn_option, run_async
from chunkd.errors import ChunkdError

__all__ = ["COMMANDS"]

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Operator commands: thin wrappers; the queries live in chunkd.ops, the drawing in
# chunkd.status_view.
# ---------------------------------------------------------------------------------------------

INT32 = click.IntRange(min=-(2**31), max=2**31 - 1)
STALE_AFTER_DEFAULT = "2m"


class JobId(click.ParamType):
    """A sync job id: a UUID, checked here so a typo is one clear line, not a server error."""

    name = "job"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import uuid

        if isinstance(value, uuid.UUID):
            return value
        try:
            return uuid.UUID(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a job id (a UUID, as printed by `chunkd enqueue`)")


JOB_ID = JobId()


def _with_connection(dsn: str, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Runs ``work(conn)`` on one connection that is always closed, also on Ctrl-C."""
    from chunkd.db import connect

    async def go() -> T:
        conn = await connect(dsn, application_name="chunkd-cli")
        try:
            return await work(conn)
        finally:
            await conn.close()

    return run_async(go())


def _console() -> Any:
    """A rich console for stdout; piped output gets a wide line instead of wrapped cells."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if piped else None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@click.command()
@dsn_option
@click.option(
    "--kind",
    required=True,
    envvar="CHUNKD_KIND",
    help="Selects the handler that runs the chunks.  [env: CHUNKD_KIND]",
)
@click.option(
    "--payload",
    default="{}",
    show_default=True,
    envvar="CHUNKD_PAYLOAD",
    help="Job payload as JSON, given to every chunk's handler.  [env: CHUNKD_PAYLOAD]",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1, max=2**31 - 1),
    default=None,
    envvar="CHUNKD_MAX_CONCURRENCY",
    help="Chunks of this job running at once; 1 = strictly in order. Default: unlimited.  "
    "[env: CHUNKD_MAX_CONCURRENCY]",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1, max=2**31 - 1),
    default=3,
    show_default=True,
    envvar="CHUNKD_MAX_ATTEMPTS",
    help="Attempts per chunk before it fails for good.  [env: CHUNKD_MAX_ATTEMPTS]",
)
@click.option(
    "--priority",
    type=INT32,
    default=0,
    show_default=True,
    envvar="CHUNKD_PRIORITY",
    help="Higher runs first.  [env: CHUNKD_PRIORITY]",
)
@click.argument("source", metavar="[FILE|-]", type=click.File("rb"), required=False)
def enqueue(
    dsn: str,
    kind: str,
    payload: str,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
    source: Any,
) -> None:
    """Create a sync job from a JSON array of chunk payloads, or NDJSON (one payload per line),
    read from FILE or stdin; prints the job id.

    Nothing is inserted unless the whole input is valid.
    """
    from chunkd import ops

    if source is None:
        if sys.stdin.isatty():
            raise ChunkdError("no input: give FILE, or '-' and pipe the chunks to stdin")
        source = click.open_file("-", "rb")
    job_payload = ops.parse_json_option("--payload", payload)
    chunks = ops.parse_chunks(source.read(ops.MAX_INPUT_BYTES + 1))
    job_id = _with_connection(
        dsn,
        lambda conn: ops.enqueue(
            conn,
            kind=kind,
            chunks=chunks,
            payload=job_payload,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            priority=priority,
        ),
    )
    click.echo(str(job_id))


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID, required=False)
@click.option(
    "--watch",
    is_flag=True,
    envvar="CHUNKD_WATCH",
    help="Redraw live progress until every shown job is finished (or Ctrl-C).  [env: CHUNKD_WATCH]",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="CHUNKD_JSON",
    help="Machine-readable JSON; with --watch one JSON document per line.  [env: CHUNKD_JSON]",
)
@click.option(
    "--interval",
    type=DURATION,
    default="1s",
    show_default=True,
    envvar="CHUNKD_INTERVAL",
    help="Redraw interval of --watch.  [env: CHUNKD_INTERVAL]",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    envvar="CHUNKD_LIMIT",
    help="Newest jobs shown without JOB; 0 = all.  [env: CHUNKD_LIMIT]",
)
@click.option(
    "--stale-after",
    type=DURATION,
    default=STALE_AFTER_DEFAULT,
    show_default=True,
    envvar="CHUNKD_STALE_AFTER",
    help="A worker silent this long is not counted as live.  [env: CHUNKD_STALE_AFTER]",
)
def status(
    dsn: str,
    job: Any,
    watch: bool,
    as_json: bool,
    interval: float,
    limit: int,
    stale_after: float,
) -> None:
    """Progress of all jobs (newest first), or of one JOB with its recent errors."""
    from chunkd.status_view import watch as show

    if interval <= 0:
        raise ChunkdError("--interval must be positive")
    _with_connection(
        dsn,
        lambda conn: show(
            conn,
            _console(),
            job,
            limit=limit or None,
            stale_after_s=stale_after,
            interval_s=interval,
            as_json=as_json,
            once=not watch,
            emit=click.echo,
        ),
    )


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
def retry(dsn: str, job: Any) -> None:
    """Put JOB's failed chunks back to pending, with their attempts reset."""
    from chunkd import ops

    n = _with_connection(dsn, lambda conn: ops.retry_failed(conn, job))
    click.echo(f"retried {_plural(n, 'failed chunk')} of job {job}")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
def cancel(dsn: str, job: Any) -> None:
    """Cancel JOB: its pending and processing chunks become cancelled."""
    from chunkd import ops

    n = _with_connection(dsn, lambda conn: ops.cancel_job(conn, job))
    click.echo(f"cancelled {_plural(n, 'chunk')} of job {job}")


@click.command()
@dsn_option
def reap(dsn: str) -> None:
    """Return chunks whose lease expired (dead or hung worker) to pending, or fail them."""
    from chunkd import ops

    n = _with_connection(dsn, ops.reap)
    click.echo(f"reaped {_plural(n, 'chunk')} with an expired lease")


@click.command()
@dsn_option
@click.option(
    "--older-than",
    type=DURATION,
    required=True,
    envvar="CHUNKD_OLDER_THAN",
    help="Delete jobs finished longer ago than this (e.g. 7d), with all their rows.  "
    "[env: CHUNKD_OLDER_THAN]",
)
def purge(dsn: str, older_than: float) -> None:
    """Delete finished jobs with their chunks, queue rows and audit events."""
    from chunkd import ops

    n = _with_connection(dsn, lambda conn: ops.purge_finished(conn, older_than))
    click.echo(f"purged {_plural(n, 'finished job')}")


@click.command()
@dsn_option
@click.option(
    "--json", "as_json", is_flag=True, envvar="CHUNKD_JSON", help="JSON.  [env: CHUNKD_JSON]"
)
@click.option(
    "--stale-after",
    type=DURATION,
    default=STALE_AFTER_DEFAULT,
    show_default=True,
    envvar="CHUNKD_STALE_AFTER",
    help="A worker silent this long is shown as stale.  [env: CHUNKD_STALE_AFTER]",
)
def workers(dsn: str, as_json: bool, stale_after: float) -> None:
    """Registered daemons: live, or stale (no heartbeat for --stale-after)."""
    import json

    from chunkd import ops
    from chunkd.status_view import workers_table

    rows = _with_connection(dsn, lambda conn: ops.list_workers(conn, stale_after_s=stale_after))
    if as_json:
        click.echo(json.dumps([w.as_json() for w in rows]))
    else:
        _console().print(workers_table(rows))


COMMANDS = (enqueue, status, retry, cancel, reap, purge, workers)
