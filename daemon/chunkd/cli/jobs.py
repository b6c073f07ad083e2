"""The job commands: enqueue, status, retry, cancel.

Thin wrappers: the queries live in :mod:`chunkd.ops`, the drawing in
:mod:`chunkd.cli.status_view`.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import IO
from uuid import UUID

import click

from chunkd.cli.options import (
    DURATION,
    INT32,
    JOB_ID,
    TIMESTAMP,
    console,
    dsn_option,
    heartbeats_or_stale_after_option,
    lock_wait_option,
    plural,
    with_connection,
)
from chunkd.errors import ChunkdError

__all__ = ["cancel", "enqueue", "retry", "status"]


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
@click.option(
    "--max-per-second",
    default=None,
    envvar="CHUNKD_MAX_PER_SECOND",
    metavar="RATE",
    help="This job's own rate limit, fleet-wide: 5/s, 90/m, 0.5. Default: none.  "
    "[env: CHUNKD_MAX_PER_SECOND]",
)
@click.option(
    "--concurrency-key",
    default=None,
    envvar="CHUNKD_CONCURRENCY_KEY",
    help="Share a concurrency limit (`chunkd limit --key KEY --concurrency N`) with the other "
    "jobs of this key, e.g. a tenant.  [env: CHUNKD_CONCURRENCY_KEY]",
)
@click.option(
    "--at",
    "run_at",
    type=TIMESTAMP,
    default=None,
    envvar="CHUNKD_AT",
    help="Start no chunk before this time: ISO 8601 with a time zone, e.g. "
    "2026-12-01T08:00:00Z.  [env: CHUNKD_AT]",
)
@click.option(
    "--in",
    "run_in",
    type=DURATION,
    default=None,
    envvar="CHUNKD_IN",
    help="Start no chunk before this long from now, by the database clock: 90s, 15m, 2h.  "
    "[env: CHUNKD_IN]",
)
@click.option(
    "--dedupe-key",
    default=None,
    envvar="CHUNKD_DEDUPE_KEY",
    help="While an unfinished job of this kind has this key, create nothing and print that "
    "job's id (said on stderr).  [env: CHUNKD_DEDUPE_KEY]",
)
@click.option(
    "--open",
    "open_job",
    is_flag=True,
    envvar="CHUNKD_OPEN",
    help="An open job: more chunks come with `chunkd append`, and it never finishes before "
    "`chunkd close`. The input may then be empty.  [env: CHUNKD_OPEN]",
)
@click.option(
    "--on-finish-kind",
    default=None,
    envvar="CHUNKD_ON_FINISH_KIND",
    help="When the job finishes, a one-chunk job of this kind is created (its chunk carries "
    "the job's id, status and counts).  [env: CHUNKD_ON_FINISH_KIND]",
)
@click.option(
    "--traceparent",
    default=None,
    envvar="TRACEPARENT",
    help="The W3C trace context whose trace the job's chunk spans join "
    "(00-<trace id>-<span id>-<flags>), e.g. a traced script's own.  [env: TRACEPARENT]",
)
@click.option(
    "--label",
    default=None,
    envvar="CHUNKD_LABEL",
    help="A short text to find the job by (1-200 characters): the dashboard shows it and "
    "its search matches its start.  [env: CHUNKD_LABEL]",
)
@click.argument("source", metavar="[FILE|-]", type=click.File("rb"), required=False)
def enqueue(
    dsn: str,
    kind: str,
    payload: str,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
    run_at: datetime | None,
    run_in: float | None,
    dedupe_key: str | None,
    open_job: bool,
    on_finish_kind: str | None,
    max_per_second: str | None,
    concurrency_key: str | None,
    traceparent: str | None,
    label: str | None,
    source: IO[bytes] | None,
) -> None:
    """Create a sync job from a JSON array of chunk payloads, or NDJSON (one payload per line),
    read from FILE or stdin; prints the job id.

    Nothing is inserted unless the whole input is valid. With --dedupe-key, an unfinished job
    of the same kind with that key is not duplicated: its id is printed instead.
    """
    from chunkd import ops

    if run_at is not None and run_in is not None:
        raise ChunkdError("--at and --in both say when to start: give one of them")
    if dedupe_key is not None and not dedupe_key:
        raise ChunkdError("--dedupe-key must not be empty (leave it out for no key)")
    if label is not None and not label:
        raise ChunkdError("--label must not be empty (leave it out for no label)")
    if source is None:
        if sys.stdin.isatty() and not open_job:
            raise ChunkdError("no input: give FILE, or '-' and pipe the chunks to stdin")
        source = None if sys.stdin.isatty() else click.open_file("-", "rb")
    job_payload = ops.parse_json_option("--payload", payload)
    rate = ops.parse_rate(max_per_second) if max_per_second is not None else None
    data = source.read(ops.MAX_INPUT_BYTES + 1) if source is not None else b""
    chunks = [] if open_job and not data.strip() else ops.parse_chunks(data)
    done = with_connection(
        dsn,
        lambda conn: ops.enqueue(
            conn,
            kind=kind,
            chunks=chunks,
            payload=job_payload,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            priority=priority,
            run_at=run_at,
            run_in_s=run_in,
            dedupe_key=dedupe_key,
            open_job=open_job,
            on_finish_kind=on_finish_kind,
            max_per_second=rate,
            concurrency_key=concurrency_key,
            traceparent=traceparent or None,
            label=label,
        ),
    )
    click.echo(str(done.job_id))
    if not done.created:
        click.echo(
            f"chunkd: an unfinished {kind!r} job holds dedupe key {dedupe_key!r}: "
            "nothing created, its id printed",
            err=True,
        )


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
@heartbeats_or_stale_after_option("is not counted as live")
def status(
    dsn: str,
    job: UUID | None,
    watch: bool,
    as_json: bool,
    interval: float,
    limit: int,
    stale_after: float | None,
) -> None:
    """Progress of all jobs (newest first), or of one JOB with its recent errors."""
    from chunkd.cli.status_view import watch as show

    if interval <= 0:
        raise ChunkdError("--interval must be positive")
    with_connection(
        dsn,
        lambda conn: show(
            conn,
            console(),
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
@lock_wait_option
def retry(dsn: str, job: UUID, lock_wait: float) -> None:
    """Put JOB's failed chunks back to pending, with their attempts reset."""
    from chunkd import ops

    n = with_connection(dsn, lambda conn: ops.retry_failed(conn, job, lock_wait_s=lock_wait))
    click.echo(f"retried {plural(n, 'failed chunk')} of job {job}")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
@lock_wait_option
def cancel(dsn: str, job: UUID, lock_wait: float) -> None:
    """Cancel JOB: its pending and processing chunks become cancelled."""
    from chunkd import ops

    n = with_connection(dsn, lambda conn: ops.cancel_job(conn, job, lock_wait_s=lock_wait))
    click.echo(f"cancelled {plural(n, 'chunk')} of job {job}")
