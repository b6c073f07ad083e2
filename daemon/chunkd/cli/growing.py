"""The commands for jobs that grow and for waiting on jobs: append, close, wait."""

from __future__ import annotations

import sys
from typing import IO
from uuid import UUID

import click

from chunkd.cli.options import (
    DURATION,
    JOB_ID,
    dsn_option,
    lock_wait_option,
    plural,
    with_connection,
)
from chunkd.errors import ChunkdError

__all__ = ["EXIT_NOT_COMPLETED", "EXIT_TIMEOUT", "append", "close", "wait"]

#: `chunkd wait`: the job finished, but not every chunk completed (partial_failure, cancelled).
EXIT_NOT_COMPLETED = 1
#: `chunkd wait`: the timeout passed first (as timeout(1) exits).
EXIT_TIMEOUT = 124


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
@click.argument("source", metavar="[FILE|-]", type=click.File("rb"), required=False)
@lock_wait_option
def append(dsn: str, job: UUID, source: IO[bytes] | None, lock_wait: float) -> None:
    """Append chunks to the open JOB (created with `enqueue --open`): a JSON array of chunk
    payloads, or NDJSON, from FILE or stdin.

    Nothing is appended unless the whole input is valid.
    """
    from chunkd import ops

    if source is None:
        if sys.stdin.isatty():
            raise ChunkdError("no input: give FILE, or '-' and pipe the chunks to stdin")
        source = click.open_file("-", "rb")
    chunks = ops.parse_chunks(source.read(ops.MAX_INPUT_BYTES + 1))
    n = with_connection(dsn, lambda conn: ops.append(conn, job, chunks, lock_wait_s=lock_wait))
    click.echo(f"appended {plural(n, 'chunk')} to job {job}")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
@lock_wait_option
def close(dsn: str, job: UUID, lock_wait: float) -> None:
    """Close the open JOB: no more appends; it finishes once its last chunk is done."""
    from chunkd import ops

    closed = with_connection(dsn, lambda conn: ops.close(conn, job, lock_wait_s=lock_wait))
    click.echo(f"closed job {job}" if closed else f"job {job} was already closed")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID)
@click.option(
    "--timeout",
    type=DURATION,
    default=None,
    envvar="CHUNKD_TIMEOUT",
    help="Give up after this long (e.g. 10m), exit 124. Default: wait as long as it takes.  "
    "[env: CHUNKD_TIMEOUT]",
)
def wait(dsn: str, job: UUID, timeout: float | None) -> None:
    """Wait until JOB finishes; print its status. Exit 0 if it completed, 1 on
    partial_failure or cancelled, 124 on timeout."""
    from chunkd import ops

    status = with_connection(dsn, lambda conn: ops.wait(conn, job, timeout))
    if status is None:
        click.echo(f"job {job} not finished after {timeout or 0:g}s", err=True)
        raise click.exceptions.Exit(EXIT_TIMEOUT)
    click.echo(f"job {job} {status}")
    if status != "completed":
        raise click.exceptions.Exit(EXIT_NOT_COMPLETED)
