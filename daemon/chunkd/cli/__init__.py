"""The ``chunkd`` command line: the group and the entry point. This package is the only place
that reads argv and the environment, sets up logging, or installs signal handlers; one module
per group of commands (:mod:`~chunkd.cli.daemon`, :mod:`~chunkd.cli.jobs`,
:mod:`~chunkd.cli.growing`, :mod:`~chunkd.cli.schedules`, :mod:`~chunkd.cli.flow`,
:mod:`~chunkd.cli.maintenance`, :mod:`~chunkd.cli.doctor`, :mod:`~chunkd.cli.web`), shared
option types in :mod:`~chunkd.cli.options`.

A user mistake (bad option, bad DSN, unknown handler, wrong schema) is one line on stderr and
exit code 2, never a traceback. A database that cannot be reached now (refused, not started,
too many connections, the connection lost) is one line and exit code 75 (``EX_TEMPFAIL``): a
service manager may try again, while it must not restart a command whose configuration is
wrong (the units' ``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from chunkd.errors import EXIT_CONFIG, EXIT_TEMPFAIL, ChunkdError
from chunkd.version import __version__

if TYPE_CHECKING:
    from chunkd.observability.logs import LogFormat

__all__ = ["main"]

EXIT_USAGE = EXIT_CONFIG


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chunkd")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    envvar="CHUNKD_LOG_FORMAT",
    show_default=True,
    help="auto: JSON lines when stdout is not a terminal.  [env: CHUNKD_LOG_FORMAT]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    envvar="CHUNKD_LOG_LEVEL",
    show_default=True,
    help="[env: CHUNKD_LOG_LEVEL]",
)
def cli(log_format: LogFormat, log_level: str) -> None:
    """chunkd: a durable chunk-processing daemon for PostgreSQL."""
    from chunkd.observability.logs import configure_logging

    configure_logging(log_format, log_level)


def _register_commands() -> None:
    from chunkd.cli.daemon import migrate, run
    from chunkd.cli.doctor import doctor
    from chunkd.cli.flow import limit, pause, resume
    from chunkd.cli.growing import append, close, wait
    from chunkd.cli.jobs import cancel, enqueue, retry, status
    from chunkd.cli.maintenance import purge, reap, retention, workers
    from chunkd.cli.schedules import schedule
    from chunkd.cli.web import web
    from chunkd.demo.command import demo

    for command in (
        migrate, run, enqueue, append, close, status, wait, retry, cancel, pause, resume, limit,
        schedule, reap, purge, retention, workers, doctor, web, demo,
    ):  # fmt: skip
        cli.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: click without its multi-line usage errors or tracebacks for user mistakes."""
    try:
        # Without standalone mode, click returns the code of click.exceptions.Exit.
        code = cli.main(args=argv, prog_name="chunkd", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"chunkd: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except ChunkdError as exc:
        _show_cause(exc)
        click.echo(f"chunkd: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ValueError as exc:
        # HandlerError and bad header options land here: user input, one line.
        _show_cause(exc)
        click.echo(f"chunkd: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        # The connection failed or was cut where no command translated it: one line, and a
        # code that says "try again". A server refusal no command translated itself (a
        # privilege, a read-only database): one line too. Anything else is a bug, and keeps
        # its traceback.
        lost = _connection_failure(exc)
        if lost is not None:
            click.echo(f"chunkd: error: {lost}", err=True)
            sys.exit(EXIT_TEMPFAIL)
        line = _server_refusal(exc)
        if line is None:
            raise
        click.echo(f"chunkd: error: {line}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)


def _show_cause(exc: Exception) -> None:
    """At ``--log-level debug``, the traceback of what caused a one-line error (an exception
    raised while importing a handler or app module), before that line."""
    import logging

    import structlog

    cause = exc.__cause__
    if cause is not None and structlog.get_logger().is_enabled_for(logging.DEBUG):
        import traceback

        click.echo("".join(traceback.format_exception(cause)).rstrip(), err=True)


def _server_refusal(exc: Exception) -> str | None:
    from chunkd.db import DatabaseError
    from chunkd.db.server_errors import describe_server_error

    return describe_server_error(exc) if isinstance(exc, DatabaseError) else None


def _connection_failure(exc: Exception) -> str | None:
    from chunkd.db import connection_failure

    reason = connection_failure(exc)
    return None if reason is None else f"the connection to the database failed: {reason}"
