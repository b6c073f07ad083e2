"""The maintenance commands: reap, purge, retention, workers."""

from __future__ import annotations

import click

from chunkd.cli.options import (
    DURATION,
    Duration,
    console,
    dsn_option,
    heartbeats_or_stale_after_option,
    lock_wait_option,
    plural,
    with_connection,
)
from chunkd.errors import ChunkdError

__all__ = ["purge", "reap", "retention", "workers"]


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


# A negative duration (`set completed -5s`) reaches the command as a word, to be refused as a
# duration, not as an unknown option `-5`.
@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, metavar="[set STATE DURATION]")
@dsn_option
@click.option(
    "--json", "as_json", is_flag=True, envvar="CHUNKD_JSON", help="JSON.  [env: CHUNKD_JSON]"
)
@lock_wait_option
def retention(dsn: str, words: tuple[str, ...], as_json: bool, lock_wait: float) -> None:
    """How long finished jobs are kept, per state: completed, failed, cancelled.

    `chunkd retention set STATE DURATION` sets one (durations as 30s, 15m, 3d) for jobs that
    finish from then on. The daemons move finished jobs to the history and drop it once
    expired (docs/storage.md).
    """
    import json

    from chunkd import ops

    if words:
        if words[0] != "set" or len(words) != 3:
            raise click.UsageError(
                "use `chunkd retention` to show the policies, or `chunkd retention set STATE "
                "DURATION` (e.g. set completed 3d) to change one"
            )
        state, text = words[1].lower(), words[2]
        keep_s = Duration().convert(text, None, None)
        if not 1 <= keep_s <= ops.MAX_RETENTION_S:
            raise ChunkdError(f"a retention must be between 1 second and 36500 days, got {text!r}")
        with_connection(
            dsn, lambda conn: ops.set_retention(conn, state, keep_s, lock_wait_s=lock_wait)
        )
    policies = with_connection(dsn, ops.retention_policies)
    if as_json:
        click.echo(json.dumps([p.as_json() for p in policies]))
        return
    width = max(len(p.state) for p in policies)
    for p in policies:
        click.echo(f"{p.state:<{width}}  kept {ops.format_keep(p.keep_s)} after it finished")
