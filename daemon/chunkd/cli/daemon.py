"""``chunkd migrate`` and ``chunkd run``: installing the schema and running the daemon.

``run`` is the only place that installs signal handlers: the first SIGTERM/SIGINT asks for a
graceful stop, a second exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import click

from chunkd.cli.options import DURATION, LINE, dsn_option, lock_wait_option, run_async
from chunkd.errors import ChunkdError

if TYPE_CHECKING:
    from chunkd.handlers import HandlerRegistry
    from chunkd.observability.tracing import Tracing
    from chunkd.settings import RunSettings

__all__ = ["migrate", "run"]


@click.command()
@dsn_option
@click.option("--check", is_flag=True, help="Only check: exit 0 if current, 1 if behind or ahead.")
@click.option(
    "--reapply",
    is_flag=True,
    help="Also put back the definitions changed by hand since (what chunkd doctor reports).",
)
@lock_wait_option
def migrate(dsn: str, check: bool, reapply: bool, lock_wait: float) -> None:
    """Install or upgrade the chunkd schema (safe to run concurrently and repeatedly)."""
    from chunkd.db import connect
    from chunkd.db.migrate import apply_migrations, check_version
    from chunkd.db.sql_files import definitions

    async def go() -> None:
        conn = await connect(dsn)
        try:
            if check:
                state = await check_version(conn)
                click.echo(f"chunkd schema is current (version {max(state.applied)})")
                if state.newer_definitions:
                    click.echo(
                        f"its definitions come from chunkd {state.newer_definitions}, newer "
                        "than this one: upgrade this chunkd"
                    )
                return
            migrated = await apply_migrations(conn, lock_wait_s=lock_wait, reapply_edited=reapply)
            if migrated.versions:
                click.echo(f"applied migration(s) {', '.join(map(str, migrated.versions))}")
            if len(migrated.definitions) == len(definitions()):
                click.echo(f"applied the current definitions (all {len(definitions())} files)")
            elif migrated.definitions:
                click.echo(f"applied definition(s) {', '.join(migrated.definitions)}")
            if migrated.nothing:
                click.echo("chunkd schema already current: nothing changed")
        finally:
            await conn.close()

    from chunkd.errors import SchemaVersionError

    try:
        run_async(go())
    except SchemaVersionError as exc:
        if check:
            raise click.exceptions.Exit(_fail_line(str(exc), code=1)) from None
        raise


def _fail_line(message: str, code: int) -> int:
    click.echo(f"chunkd: error: {message}", err=True)
    return code


@click.command()
@click.argument("app", required=False, envvar="CHUNKD_APP")
@dsn_option
@click.option(
    "--app-dir",
    type=click.Path(exists=True, file_okay=False),
    default=".",
    show_default=True,
    envvar="CHUNKD_APP_DIR",
    help="Put this directory first on the import path (APP and module:function handlers are "
    "imported from it).  [env: CHUNKD_APP_DIR]",
)
@click.option(
    "--handler",
    "handlers",
    multiple=True,
    type=LINE,
    envvar="CHUNKD_HANDLER",
    help="KIND=SPEC, repeatable; SPEC is module:function, http:URL or exec:COMMAND. "
    "Wins over APP and the chunkd.handlers entry points.  [env: CHUNKD_HANDLER, one per line]",
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
    "--max-snoozes",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    envvar="CHUNKD_MAX_SNOOZES",
    help="Times a chunk's RetryLater (an http: Retry-After) reschedules it without spending "
    "an attempt; past that it counts as a failed attempt.  [env: CHUNKD_MAX_SNOOZES]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    envvar="CHUNKD_METRICS_PORT",
    help="Serve Prometheus metrics (/metrics) and the probes /healthz and /readyz on this "
    "port.  [env: CHUNKD_METRICS_PORT]",
)
@click.option(
    "--stall-threshold",
    type=DURATION,
    default="1s",
    show_default=True,
    envvar="CHUNKD_STALL_THRESHOLD",
    help="An event loop blocked longer is stalled: logged as event_loop.stalled, and "
    "/healthz answers 503 while it lasts.  [env: CHUNKD_STALL_THRESHOLD]",
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
    "--progress-interval",
    type=DURATION,
    default="15s",
    show_default=True,
    envvar="CHUNKD_PROGRESS_INTERVAL",
    help="How often one progress line per active job is logged (per-chunk success lines "
    "are debug); 0 = never.  [env: CHUNKD_PROGRESS_INTERVAL]",
)
@click.option(
    "--http-header",
    "http_headers",
    multiple=True,
    help="'Name: value' header for http: handlers, repeatable; never logged.  "
    "[env: CHUNKD_HTTP_HEADERS, one per line]",
)
@click.option(
    "--schedule-interval",
    type=DURATION,
    default="5s",
    show_default=True,
    envvar="CHUNKD_SCHEDULE_INTERVAL",
    help="How often due schedules are checked at most (sooner when one is due); 0 = this "
    "daemon fires no schedule.  [env: CHUNKD_SCHEDULE_INTERVAL]",
)
@click.option(
    "--maintenance-interval",
    type=DURATION,
    default="10s",
    show_default=True,
    envvar="CHUNKD_MAINTENANCE_INTERVAL",
    help="How often finished jobs move to the history and expired history is dropped (one "
    "daemon of the fleet at a time does it); 0 = this daemon does none.  "
    "[env: CHUNKD_MAINTENANCE_INTERVAL]",
)
@click.option(
    "--schedule-clock-file",
    default=None,
    hidden=True,
    envvar="CHUNKD_SCHEDULE_CLOCK_FILE",
    help="Tests only: read the schedule clock from this file (ISO 8601).",
)
def run(
    app: str | None,
    dsn: str,
    app_dir: str,
    handlers: tuple[str, ...],
    concurrency: int,
    lease: float,
    reap_interval: float,
    poll_interval: float,
    chunk_timeout: float,
    shutdown_timeout: float,
    retry_base: float,
    retry_cap: float,
    max_snoozes: int,
    metrics_port: int | None,
    stall_threshold: float,
    metrics_interval: float,
    progress_interval: float,
    http_headers: tuple[str, ...],
    schedule_interval: float,
    maintenance_interval: float,
    schedule_clock_file: str | None,
) -> None:
    """Run the daemon: claim chunks and run their handlers until SIGTERM/SIGINT.

    APP is a chunkd.App as module:attribute (myapp.tasks:app), imported from --app-dir (the
    current directory by default).  [env: CHUNKD_APP]
    """
    from chunkd.app import load_app, put_on_import_path
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
            max_snoozes=max_snoozes,
            metrics_port=metrics_port,
            stall_threshold_s=stall_threshold,
            metrics_interval_s=metrics_interval,
            progress_interval_s=progress_interval,
            http_headers=headers,
            schedule_interval_s=schedule_interval,
            maintenance_interval_s=maintenance_interval,
            schedule_clock_file=schedule_clock_file,
        )
    except ValueError as exc:
        raise ChunkdError(str(exc)) from None
    put_on_import_path(app_dir)
    in_app = load_app(app, app_dir).handlers() if app and app.strip() else {}
    registry = load_handlers(
        list(handlers),
        HandlerOptions(timeout_s=chunk_timeout, http_headers=headers),
        app_dir=app_dir,
        base=in_app,
    )
    if not registry.handlers:
        raise ChunkdError(
            "no handlers: pass an app (chunkd run myapp.tasks:app), --handler KIND=SPEC, or "
            "install a chunkd.handlers entry point"
        )
    from chunkd.observability.tracing import configure

    # After the app is imported: a tracer provider it set up itself is kept.
    tracing = configure(os.environ)
    run_async(_run_until_signalled(settings, registry, tracing))


async def _run_until_signalled(
    settings: RunSettings, registry: HandlerRegistry, tracing: Tracing | None
) -> None:
    from chunkd.runtime.supervisor import run_daemon

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
    # Plain-def handlers run in the default executor: as many threads as chunks may run.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="chunkd-handler")
    )
    try:
        await run_daemon(settings, registry, stop, tracing=tracing)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # the last spans, at most 5 s
