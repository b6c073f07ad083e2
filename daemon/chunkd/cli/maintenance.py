"""The maintenance commands: reap, purge, workers."""

from __future__ import annotations

import click

from chunkd.cli.options import (
    DURATION,
    console,
    dsn_option,
    heartbeats_or_stale_after_option,
    lock_wait_option,
    plural,
    with_connection,
)

__all__ = ["purge", "reap", "workers"]


@click.command()
@dsn_option
def reap(dsn: str) -> None:
    """Return chunks whose lease expired (dead or hung worker) to pending, or fail them."""
    from chunkd import ops

    n = with_connection(dsn, ops.reap)
    click.echo(f"reaped {plural(n, 'chunk')} with an expired lease")


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
@lock_wait_option
def purge(dsn: str, older_than: float, lock_wait: float) -> None:
    """Delete finished jobs with their chunks, queue rows and audit events."""
    from chunkd import ops

    n = with_connection(
        dsn, lambda conn: ops.purge_finished(conn, older_than, lock_wait_s=lock_wait)
    )
    click.echo(f"purged {plural(n, 'finished job')}")


@click.command()
@dsn_option
@click.option(
    "--json", "as_json", is_flag=True, envvar="CHUNKD_JSON", help="JSON.  [env: CHUNKD_JSON]"
)
@heartbeats_or_stale_after_option("is shown as stale")
def workers(dsn: str, as_json: bool, stale_after: float | None) -> None:
    """Registered daemons: live, or stale (missed three of its heartbeats, when the reaper
    takes it for dead; or silent for --stale-after)."""
    import json

    from chunkd import ops
    from chunkd.cli.status_view import workers_table

    rows = with_connection(dsn, lambda conn: ops.list_workers(conn, stale_after_s=stale_after))
    if as_json:
        click.echo(json.dumps([w.as_json() for w in rows]))
    else:
        console().print(workers_table(rows))
