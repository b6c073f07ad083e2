"""``chunkd doctor``: what in this database (and this host's view of it) will hurt the queue."""

from __future__ import annotations

import click

from chunkd.cli.options import DURATION, dsn_option, run_async, stale_after_option
from chunkd.errors import ChunkdError

__all__ = ["doctor"]


@click.command()
@dsn_option
@click.option(
    "--json", "as_json", is_flag=True, envvar="CHUNKD_JSON", help="JSON.  [env: CHUNKD_JSON]"
)
@click.option(
    "--warn-age",
    type=DURATION,
    default="1m",
    show_default=True,
    envvar="CHUNKD_DOCTOR_WARN_AGE",
    help="A transaction, snapshot or idle-in-transaction session older than this is a "
    "warning.  [env: CHUNKD_DOCTOR_WARN_AGE]",
)
@click.option(
    "--problem-age",
    type=DURATION,
    default="15m",
    show_default=True,
    envvar="CHUNKD_DOCTOR_PROBLEM_AGE",
    help="... and older than this a problem.  [env: CHUNKD_DOCTOR_PROBLEM_AGE]",
)
@stale_after_option("counts as dead", own_heartbeats=True)
def doctor(
    dsn: str, as_json: bool, warn_age: float, problem_age: float, stale_after: float | None
) -> None:
    """Check the database for what hurts the queue, one line each with what to do.

    Read-only. Exit code: 0 all fine, 1 a warning, 2 a problem.
    """
    import json

    from chunkd.ops.doctor import DoctorOptions, exit_code, run_doctor
    from chunkd.version import __version__

    try:
        options = DoctorOptions(
            warn_age_s=warn_age, problem_age_s=problem_age, stale_after_s=stale_after
        )
    except ValueError as exc:
        raise ChunkdError(str(exc)) from None
    findings = run_async(run_doctor(dsn, options))
    code = exit_code(findings)
    if as_json:
        worst = ("ok", "warning", "problem")[code]
        report = {
            "version": __version__,
            "worst": worst,
            "exit_code": code,
            "findings": [f.as_json() for f in findings],
        }
        click.echo(json.dumps(report, default=str))
    else:
        for finding in findings:
            click.echo(finding.line())
    raise click.exceptions.Exit(code)
