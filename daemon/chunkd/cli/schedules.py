"""``chunkd schedule add|list|remove|pause|resume``: recurring jobs, fired by the daemons."""

from __future__ import annotations

import click

from chunkd.cli.options import INT32, console, dsn_option, lock_wait_option, with_connection
from chunkd.errors import ChunkdError

__all__ = ["schedule"]


@click.group()
def schedule() -> None:
    """Recurring jobs: the daemons fire each due time once, however many run."""


@schedule.command("add")
@dsn_option
@click.argument("name")
@click.option(
    "--cron", required=True, help="When: 5 fields, e.g. '*/15 * * * *' (or 6 with seconds)."
)
@click.option("--kind", required=True, help="The kind of the job created at each due time.")
@click.option(
    "--timezone",
    default="UTC",
    show_default=True,
    help="IANA time zone the cron expression is read in (e.g. Europe/Berlin).",
)
@click.option(
    "--chunks",
    default="[{}]",
    show_default=True,
    help="The job's chunks: a JSON array of chunk payloads.",
)
@click.option("--payload", default="{}", show_default=True, help="The job's payload (JSON).")
@click.option(
    "--dedupe/--no-dedupe",
    default=True,
    show_default=True,
    help="Skip a due time while the schedule's previous job is still unfinished.",
)
@click.option("--max-concurrency", type=click.IntRange(min=1, max=2**31 - 1), default=None)
@click.option("--max-attempts", type=click.IntRange(min=1, max=2**31 - 1), default=3)
@click.option("--priority", type=INT32, default=0)
@lock_wait_option
def add(
    dsn: str,
    name: str,
    cron: str,
    kind: str,
    timezone: str,
    chunks: str,
    payload: str,
    dedupe: bool,
    max_concurrency: int | None,
    max_attempts: int,
    priority: int,
    lock_wait: float,
) -> None:
    """Create the schedule NAME, or replace its definition."""
    from chunkd import ops

    chunk_list = ops.parse_json_option("--chunks", chunks)
    if not isinstance(chunk_list, list) or not chunk_list:
        raise ChunkdError("--chunks must be a non-empty JSON array of chunk payloads")
    job_payload = ops.parse_json_option("--payload", payload)
    outcome = with_connection(
        dsn,
        lambda conn: ops.add_schedule(
            conn,
            name=name,
            cron=cron,
            kind=kind,
            chunks=chunk_list,
            payload=job_payload,
            timezone=timezone,
            dedupe=dedupe,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            priority=priority,
            lock_wait_s=lock_wait,
        ),
    )
    click.echo(f"{outcome} schedule {name!r}: {cron} ({timezone})")


@schedule.command("list")
@dsn_option
@click.option(
    "--json", "as_json", is_flag=True, envvar="CHUNKD_JSON", help="JSON.  [env: CHUNKD_JSON]"
)
def list_(dsn: str, as_json: bool) -> None:
    """Every schedule, with its next and last fire."""
    import json

    from rich.table import Table

    from chunkd import ops

    rows = with_connection(dsn, ops.list_schedules)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in rows]))
        return
    table = Table("name", "cron", "timezone", "kind", "state", "next fire", "last fire", "note")
    for r in rows:
        state = "paused" if r.paused_at else "active"
        nxt = "not planned yet" if r.next_fire_at is None else r.next_fire_at.isoformat()
        if r.last_error:
            nxt = "-"
        last = r.last_fired_at.isoformat() if r.last_fired_at else "never"
        table.add_row(r.name, r.cron, r.timezone, r.kind, state, nxt, last, r.last_error or "")
    console().print(table)


@schedule.command("remove")
@dsn_option
@click.argument("name")
@lock_wait_option
def remove(dsn: str, name: str, lock_wait: float) -> None:
    """Delete the schedule NAME (jobs it created stay)."""
    from chunkd import ops

    with_connection(dsn, lambda conn: ops.remove_schedule(conn, name, lock_wait_s=lock_wait))
    click.echo(f"removed schedule {name!r}")


@schedule.command("pause")
@dsn_option
@click.argument("name")
@lock_wait_option
def pause(dsn: str, name: str, lock_wait: float) -> None:
    """Stop firing NAME until resumed."""
    from chunkd import ops

    with_connection(dsn, lambda conn: ops.pause_schedule(conn, name, lock_wait_s=lock_wait))
    click.echo(f"paused schedule {name!r}")


@schedule.command("resume")
@dsn_option
@click.argument("name")
@lock_wait_option
def resume(dsn: str, name: str, lock_wait: float) -> None:
    """Fire NAME again, from its next due time (times missed while paused do not fire)."""
    from chunkd import ops

    with_connection(dsn, lambda conn: ops.resume_schedule(conn, name, lock_wait_s=lock_wait))
    click.echo(f"resumed schedule {name!r}")
