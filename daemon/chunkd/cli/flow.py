"""The flow-control commands: pause, resume, limit.

Thin wrappers over :mod:`chunkd.ops.flow`. What to act on is always given on the command line,
never read from the environment: a stray ``CHUNKD_KIND`` must not pause a whole kind.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

import click

from chunkd.cli.options import (
    JOB_ID,
    console,
    dsn_option,
    lock_wait_option,
    plural,
    with_connection,
)
from chunkd.errors import ChunkdError

__all__ = ["limit", "pause", "resume"]


def _target(job: UUID | None, kind: str | None) -> None:
    if (job is None) == (kind is None):
        raise ChunkdError("give a JOB id or --kind KIND (one of them)")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID, required=False)
@click.option("--kind", help="Pause every job of this kind, present and future.")
@lock_wait_option
def pause(dsn: str, job: UUID | None, kind: str | None, lock_wait: float) -> None:
    """Pause JOB, or a whole --kind: nothing new is claimed once this returns; chunks in flight
    finish, retries keep their schedule. `chunkd resume` undoes it."""
    from chunkd import ops

    _target(job, kind)
    if job is not None:
        job_id = job
        n = with_connection(dsn, lambda conn: ops.pause_job(conn, job_id, lock_wait_s=lock_wait))
        what = f"job {job}"
    else:
        name = str(kind)
        n = with_connection(dsn, lambda conn: ops.pause_kind(conn, name, lock_wait_s=lock_wait))
        what = f"kind {name!r}"
    click.echo(f"paused {what}: {plural(n, 'pending chunk')} held (chunks in flight finish)")


@click.command()
@dsn_option
@click.argument("job", type=JOB_ID, required=False)
@click.option("--kind", help="Resume a kind paused with `chunkd pause --kind`.")
@lock_wait_option
def resume(dsn: str, job: UUID | None, kind: str | None, lock_wait: float) -> None:
    """Resume a paused JOB or --kind; idle daemons are woken at once."""
    from chunkd import ops

    _target(job, kind)
    if job is not None:
        job_id = job
        n = with_connection(dsn, lambda conn: ops.resume_job(conn, job_id, lock_wait_s=lock_wait))
        what = f"job {job}"
    else:
        name = str(kind)
        n = with_connection(dsn, lambda conn: ops.resume_kind(conn, name, lock_wait_s=lock_wait))
        what = f"kind {name!r}"
    click.echo(f"resumed {what}: {plural(n, 'pending chunk')}")


class ConcurrencyLimit(click.ParamType[int | None]):
    """A concurrency limit: a whole number >= 1, or ``none`` to remove it."""

    name = "N|none"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() in ("none", "off", "unlimited"):
            return None
        try:
            number = int(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a whole number or none", param, ctx)
        if not 1 <= number <= 2**31 - 1:
            self.fail(f"{value!r} must be at least 1 (none removes the limit)", param, ctx)
        return number


@click.command()
@dsn_option
@click.argument("rate", required=False, metavar="[RATE]")
@click.option("--kind", help="Limit how fast chunks of this kind start: RATE, e.g. 20/s.")
@click.option(
    "--burst",
    type=click.IntRange(min=1, max=2**31 - 1),
    help="Chunks that may start at once after an idle spell (with --kind; default: a third "
    "of a second of RATE, at least 1).",
)
@click.option("--key", help="Limit the chunks processing at once across a concurrency key.")
@click.option(
    "--concurrency",
    type=ConcurrencyLimit(),
    default=None,
    help="With --key: at most N processing at once, fleet-wide; none removes the limit.",
)
@click.option("--list", "show", is_flag=True, help="Show the flow controls in effect.")
@click.option("--json", "as_json", is_flag=True, help="With --list: JSON.")
@lock_wait_option
def limit(
    dsn: str,
    rate: str | None,
    kind: str | None,
    burst: int | None,
    key: str | None,
    concurrency: int | None,
    show: bool,
    as_json: bool,
    lock_wait: float,
) -> None:
    """Rate-limit a kind (`--kind K 20/s [--burst N]`, `--kind K none` removes it), limit a
    concurrency key (`--key K --concurrency 2`), or show what is in effect (`--list`).

    RATE: chunks per second, minute or hour (20/s, 90/m, 3600/h, 0.5), or none. Limits hold
    across every daemon on every host: they are kept and enforced by the database.
    """
    from chunkd import ops

    concurrency_given = (
        click.get_current_context().get_parameter_source("concurrency")
        is click.core.ParameterSource.COMMANDLINE
    )
    others = rate is not None or burst is not None or concurrency_given
    if show or (kind is None and key is None):
        if kind is not None or key is not None or others:
            raise ChunkdError(
                "--list takes no other option; a RATE needs --kind KIND, --concurrency needs "
                "--key KEY"
                if show
                else "a RATE needs --kind KIND, --concurrency needs --key KEY"
            )
        _show(dsn, as_json)
        return
    if kind is not None and key is not None:
        raise ChunkdError("give --kind or --key, not both")
    if kind is not None:
        if concurrency_given:
            raise ChunkdError("--concurrency goes with --key, not --kind")
        if rate is None:
            raise ChunkdError("--kind needs a RATE, e.g. `chunkd limit --kind mail 20/s`")
        per_second = ops.parse_rate(rate)
        if per_second is None and burst is not None:
            raise ChunkdError("--burst needs a rate")
        _set_rate(dsn, kind, per_second, burst, lock_wait)
        return
    name = str(key)
    if rate is not None or burst is not None:
        raise ChunkdError("--key takes --concurrency N, not a rate")
    if not concurrency_given:
        raise ChunkdError("--key needs --concurrency N (or none to remove the limit)")
    with_connection(
        dsn,
        lambda conn: ops.set_concurrency_limit(conn, name, concurrency, lock_wait_s=lock_wait),
    )
    if concurrency is None:
        click.echo(f"removed the concurrency limit of key {name!r}")
    else:
        click.echo(f"key {name!r}: at most {concurrency} chunks processing at once")


def _set_rate(
    dsn: str, kind: str, per_second: Decimal | None, burst: int | None, lock_wait: float
) -> None:
    from chunkd import ops

    with_connection(
        dsn, lambda conn: ops.set_rate_limit(conn, kind, per_second, burst, lock_wait_s=lock_wait)
    )
    if per_second is None:
        click.echo(f"removed the rate limit of kind {kind!r}")
        return
    burst_text = f"burst {burst}" if burst is not None else "default burst"
    click.echo(f"kind {kind!r}: at most {ops.format_rate(per_second)} ({burst_text})")


def _show(dsn: str, as_json: bool) -> None:
    import json

    from chunkd import ops
    from chunkd.cli.status_view import flow_table

    limits = with_connection(dsn, ops.flow_limits)
    if as_json:
        click.echo(json.dumps([item.as_json() for item in limits]))
    else:
        console().print(flow_table(limits))
