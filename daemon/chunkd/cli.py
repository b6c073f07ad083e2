"""The ``chunkd`` command line: the only place that reads argv and the environment, sets up
logging, or installs signal handlers.

A user mistake (bad option, bad DSN, unknown handler, wrong schema) is one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from chunkd import __version__
from chunkd.errors import ChunkdError
from chunkd.settings import parse_duration

__all__ = ["main"]

T = TypeVar("T")
EXIT_USAGE = 2


class Duration(click.ParamType):
    """Seconds as a number or with a unit: 30, 30s, 500ms, 5m, 2h, 7d."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class Line(click.ParamType):
    """A value that may contain spaces (``exec:`` commands): from the environment, a list of
    them is one per line, not split on whitespace as click does by default."""

    name = "text"
    envvar_list_splitter = "\n"


LINE = Line()


def dsn_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dsn",
        envvar=["CHUNKD_DSN", "DATABASE_URL"],
        required=True,
        help="PostgreSQL connection URI.  [env: CHUNKD_DSN, DATABASE_URL]",
    )(func)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(coro)


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
def cli(log_format: str, log_level: str) -> None:
    """chunkd: a durable chunk-processing daemon for PostgreSQL."""
    from chunkd.logs import configure_logging

    configure_logging(log_format, log_level)  # type: ignore[arg-type]


@cli.command()
@dsn_option
@click.option("--check", is_flag=True, help="Only check: exit 0 if current, 1 if behind or ahead.")
def migrate(dsn: str, check: bool) -> None:
    """Install or upgrade the chunkd schema (safe to run concurrently and repeatedly)."""
    from chunkd.db import connect
    from chunkd.migrate import apply_migrations, check_schema

    async def go() -> None:
        conn = await connect(dsn)
        try:
            if check:
                state = await check_schema(conn)
                click.echo(f"chunkd schema is current (version {max(state.applied)})")
                return
            applied = await apply_migrations(conn)
            if applied:
                click.echo(f"applied migration(s) {', '.join(map(str, applied))}")
            else:
                click.echo("chunkd schema already current")
        finally:
            await conn.close()

    from chunkd.errors import SchemaVersionError

    try:
        _run_async(go())
    except SchemaVersionError as exc:
        if check:
            raise click.exceptions.Exit(_fail_line(str(exc), code=1)) from None
        raise


def _fail_line(message: str, code: int) -> int:
    click.echo(f"chunkd: error: {message}", err=True)
    return code


@cli.command()
@dsn_option
@click.option(
    "--handler",
    "handlers",
    multiple=True,
    type=LINE,
    envvar="CHUNKD_HANDLER",
    help="KIND=SPEC, repeatable; SPEC is module:function, http:URL or exec:COMMAND. "
    "Also the chunkd.handlers entry points.  [env: CHUNKD_HANDLER, one per line]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    envvar="CHUNKD_CONCURRENCY",
    help="Chunks run at once.  [env: CHUNKD_CONCURRENCY]",
)
@click.option(
    "--lease",
    type=DURATION,
    default="60s",
    show_default=True,
    envvar="CHUNKD_LEASE",
    help="Claim lease, renewed every lease/3.  [env: CHUNKD_LEASE]",
)
@click.option(
    "--reap-interval",
    type=DURATION,
    default="30s",
    show_default=True,
    envvar="CHUNKD_REAP_INTERVAL",
    help="How often expired leases are reaped.  [env: CHUNKD_REAP_INTERVAL]",
)
@click.option(
    "--poll-interval",
    type=DURATION,
    default="30s",
    show_default=True,
    envvar="CHUNKD_POLL_INTERVAL",
    help="Safety poll when no notification comes.  [env: CHUNKD_POLL_INTERVAL]",
)
@click.option(
    "--chunk-timeout",
    type=DURATION,
    default="5m",
    show_default=True,
    envvar="CHUNKD_CHUNK_TIMEOUT",
    help="A handler running longer is cancelled and retried.  [env: CHUNKD_CHUNK_TIMEOUT]",
)
@click.option(
    "--shutdown-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    envvar="CHUNKD_SHUTDOWN_TIMEOUT",
    help="On SIGTERM, how long in-flight chunks may finish.  [env: CHUNKD_SHUTDOWN_TIMEOUT]",
)
@click.option(
    "--retry-base",
    type=DURATION,
    default="2s",
    show_default=True,
    envvar="CHUNKD_RETRY_BASE",
    help="First retry delay; doubles per attempt, jittered.  [env: CHUNKD_RETRY_BASE]",
)
@click.option(
    "--retry-cap",
    type=DURATION,
    default="10m",
    show_default=True,
    envvar="CHUNKD_RETRY_CAP",
    help="Longest retry delay.  [env: CHUNKD_RETRY_CAP]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    envvar="CHUNKD_METRICS_PORT",
    help="Serve Prometheus metrics on this port.  [env: CHUNKD_METRICS_PORT]",
)
@click.option(
    "--metrics-interval",
    type=DURATION,
    default="15s",
    show_default=True,
    envvar="CHUNKD_METRICS_INTERVAL",
    help="How often queue depth is sampled for metrics.  [env: CHUNKD_METRICS_INTERVAL]",
)
@click.option(
    "--http-header",
    "http_headers",
    multiple=True,
    help="'Name: value' header for http: handlers, repeatable; never logged.  "
    "[env: CHUNKD_HTTP_HEADERS, one per line]",
)
def run(
    dsn: str,
    handlers: tuple[str, ...],
    concurrency: int,
    lease: float,
    reap_interval: float,
    poll_interval: float,
    chunk_timeout: float,
    shutdown_timeout: float,
    retry_base: float,
    retry_cap: float,
    metrics_port: int | None,
    metrics_interval: float,
    http_headers: tuple[str, ...],
) -> None:
    """Run the daemon: claim chunks and run their handlers until SIGTERM/SIGINT."""
    from chunkd.handlers import HandlerOptions, load_handlers
    from chunkd.handlers.http import headers_from_env, parse_header_option
    from chunkd.settings import RunSettings

    handlers = tuple(h for h in handlers if h.strip())  # blank lines in CHUNKD_HANDLER
    try:
        headers = headers_from_env(os.environ.get("CHUNKD_HTTP_HEADERS", ""))
        headers.update(parse_header_option(h) for h in http_headers)
        settings = RunSettings(
            dsn=dsn,
            handlers=handlers,
            concurrency=concurrency,
            lease_s=lease,
            reap_interval_s=reap_interval,
            poll_interval_s=poll_interval,
            chunk_timeout_s=chunk_timeout,
            shutdown_timeout_s=shutdown_timeout,
            retry_base_s=retry_base,
            retry_cap_s=retry_cap,
            metrics_port=metrics_port,
            metrics_interval_s=metrics_interval,
            http_headers=headers,
        )
    except ValueError as exc:
        raise ChunkdError(str(exc)) from None
    registry = load_handlers(
        list(handlers), HandlerOptions(timeout_s=chunk_timeout, http_headers=headers)
    )
    if not registry.handlers:
        raise ChunkdError(
            "no handlers: pass --handler KIND=SPEC or install a chunkd.handlers entry point"
        )
    _run_async(_run_until_signalled(settings, registry))


async def _run_until_signalled(settings: Any, registry: Any) -> None:
    from chunkd.supervisor import run_daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            # Second signal: leave at once; leases expire and the reaper recovers the chunks.
            os.write(2, b"chunkd: second signal, exiting immediately\n")
            os._exit(1)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await run_daemon(settings, registry, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


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

    return _run_async(go())


def _console() -> Any:
    """A rich console for stdout; piped output gets a wide line instead of wrapped cells."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if piped else None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@cli.command()
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


@cli.command()
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


@cli.command()
@dsn_option
@click.argument("job", type=JOB_ID)
def retry(dsn: str, job: Any) -> None:
    """Put JOB's failed chunks back to pending, with their attempts reset."""
    from chunkd import ops

    n = _with_connection(dsn, lambda conn: ops.retry_failed(conn, job))
    click.echo(f"retried {_plural(n, 'failed chunk')} of job {job}")


@cli.command()
@dsn_option
@click.argument("job", type=JOB_ID)
def cancel(dsn: str, job: Any) -> None:
    """Cancel JOB: its pending and processing chunks become cancelled."""
    from chunkd import ops

    n = _with_connection(dsn, lambda conn: ops.cancel_job(conn, job))
    click.echo(f"cancelled {_plural(n, 'chunk')} of job {job}")


@cli.command()
@dsn_option
def reap(dsn: str) -> None:
    """Return chunks whose lease expired (dead or hung worker) to pending, or fail them."""
    from chunkd import ops

    n = _with_connection(dsn, ops.reap)
    click.echo(f"reaped {_plural(n, 'chunk')} with an expired lease")


@cli.command()
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


@cli.command()
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


def _register_commands() -> None:
    from chunkd.demo import demo

    cli.add_command(demo)


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
        click.echo(f"chunkd: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except ValueError as exc:
        # HandlerError and bad header options land here: user input, one line.
        click.echo(f"chunkd: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
