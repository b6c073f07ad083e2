"""How ``chunkd status`` and ``chunkd workers`` look: rich tables, progress bars, and the live
``--watch`` loop.

Rendering is kept apart from the queries (:mod:`chunkd.ops`) so that the same renderables
serve a one-shot print, a live redraw, and (later) ``chunkd demo``'s progress view.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from chunkd import ops
from chunkd.times import local_text

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "flow_table",
    "job_view",
    "jobs_table",
    "watch",
    "workers_table",
]

# One redraw's data: one job's detail, or the newest jobs, how many jobs exist, and the flow
# controls in effect.
Snapshot = ops.JobDetail | tuple[list[ops.JobRow], int, list[ops.FlowLimit]]

_STATUS_STYLE = {
    "scheduled": "blue",
    "pending": "yellow",
    "paused": "bold yellow",
    "processing": "cyan",
    "completed": "green",
    "partial_failure": "red",
    "cancelled": "magenta",
}


def _when(moment: datetime | str | None) -> str:
    """Local time to the second: operators compare it with their own clock and logs."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return local_text(moment)


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _bar(percentage: float, status: str, width: int = 24) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=width, no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    bar = ProgressBar(
        total=100.0,
        completed=percentage,
        width=width,
        complete_style="red" if status == "partial_failure" else "green",
        finished_style="red" if status == "partial_failure" else "green",
    )
    grid.add_row(bar, f"{percentage:6.2f}%")
    return grid


def _count(n: int, style: str) -> Text:
    return Text(str(n), style=style if n else "dim")


def jobs_table(
    jobs: Sequence[ops.JobRow],
    total_jobs: int,
    *,
    bars: bool = False,
    limits: Sequence[ops.FlowLimit] = (),
) -> RenderableType:
    """All shown jobs, newest first; ``bars`` draws progress bars instead of bare percentages;
    ``limits`` (the flow controls in effect) are summed up below the table."""
    if not jobs:
        return Group(Text("no sync jobs"), *_flow_summary(limits))
    # One space between columns and a short bar: a 160-column terminal shows everything; a
    # narrower one shortens headers and kinds first, never the job id (it is what you copy).
    table = Table(
        header_style="bold", pad_edge=False, box=None, padding=(0, 1), collapse_padding=True
    )
    table.add_column("job", no_wrap=True, min_width=36)
    table.add_column("kind", no_wrap=True, max_width=16, overflow="ellipsis")
    for name in ("total", "pending", "processing", "completed", "failed", "cancelled"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=len("partial_failure"))
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for job in jobs:
        table.add_row(
            str(job.sync_job_id),
            job.kind,
            str(job.total_chunks),
            _count(job.pending_chunks, "yellow"),
            _count(job.processing_chunks, "cyan"),
            _count(job.completed_chunks, "green"),
            _count(job.failed_chunks, "red"),
            _count(job.cancelled_chunks, "magenta"),
            _status(job.overall_status),
            _bar(job.progress_percentage, job.overall_status, width=12)
            if bars
            else f"{job.progress_percentage:.2f}%",
            _when(job.created_at),
        )
    parts: list[RenderableType] = [table]
    if total_jobs > len(jobs):
        more = f"showing the newest {len(jobs)} of {total_jobs} jobs (--limit 0 shows all)"
        parts.append(Text(more, style="dim"))
    parts.extend(_flow_summary(limits))
    return Group(*parts) if len(parts) > 1 else table


def _flow_text(item: ops.FlowLimit) -> str:
    """One flow control in a few words: ``kind 'mail' 20/s (burst 10), paused``."""
    name = item.name if item.scope == "job" else repr(item.name)
    words = [f"{item.scope} {name}"]
    if item.per_second is not None:
        words.append(f"{ops.format_rate(item.per_second)} (burst {item.burst})")
    if item.scope == "key":
        limit = item.max_concurrency
        words.append(f"at most {limit} at once" if limit is not None else "no limit")
        words.append(f"{item.processing} processing")
    if item.paused_at is not None:
        words.append("paused")
    return " ".join(words[:2]) + "".join(f", {w}" for w in words[2:])


def _flow_summary(limits: Sequence[ops.FlowLimit]) -> list[RenderableType]:
    if not limits:
        return []
    return [Text("flow control: " + "; ".join(_flow_text(x) for x in limits), style="yellow")]


def flow_table(limits: Sequence[ops.FlowLimit]) -> RenderableType:
    """``chunkd limit --list``: every paused or rate-limited kind, concurrency key and paused
    job, with its chunks processing and pending."""
    if not limits:
        return Text("no flow control in effect: nothing paused, no rate or concurrency limit")
    table = Table(header_style="bold", pad_edge=False, box=None, padding=(0, 1))
    table.add_column("scope", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for name in ("rate", "burst", "tokens", "concurrency", "processing", "pending", "jobs"):
        table.add_column(name, justify="right", no_wrap=True)
    for x in limits:
        table.add_row(
            x.scope,
            x.name,
            Text("paused", style="bold yellow") if x.paused_at is not None else "-",
            ops.format_rate(x.per_second),
            str(x.burst) if x.burst is not None else "-",
            f"{x.tokens:.1f}" if x.tokens is not None else "-",
            str(x.max_concurrency) if x.max_concurrency is not None else "-",
            str(x.processing),
            str(x.pending),
            str(x.active_jobs) if x.active_jobs is not None else "-",
        )
    return table


def _duration(seconds: float | None, *, unknown: str = "-") -> str:
    if seconds is None:
        return unknown
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def job_view(detail: ops.JobDetail) -> RenderableType:
    """One job: its counts, a progress bar, settings, rate, and its latest errors."""
    p = detail.progress
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    facts.add_row("job", str(p["sync_job_id"]))
    facts.add_row("kind", detail.kind)
    if p.get("label") is not None:
        facts.add_row("label", Text(str(p["label"])))
    facts.add_row("status", _status(detail.overall_status))
    facts.add_row("progress", _bar(float(p["progress_percentage"] or 0), detail.overall_status))
    facts.add_row(
        "chunks",
        Text.assemble(
            f"{p['total_chunks']} total: ",
            (f"{p['pending_chunks']} pending", "yellow"),
            ", ",
            (f"{p['processing_chunks']} processing", "cyan"),
            ", ",
            (f"{p['completed_chunks']} completed", "green"),
            ", ",
            (f"{p['failed_chunks']} failed", "red"),
            ", ",
            (f"{p['cancelled_chunks']} cancelled", "magenta"),
        ),
    )
    rate = p.get("chunks_per_second")
    eta = (
        "none while paused"
        if detail.overall_status == "paused"
        else _duration(p.get("eta_seconds"), unknown="unknown")
    )
    facts.add_row("rate", f"{rate} chunks/s, eta {eta}" if rate is not None else "- (not started)")
    facts.add_row(
        "settings",
        f"priority {detail.priority}, max_concurrency "
        f"{detail.max_concurrency if detail.max_concurrency is not None else 'unlimited'}, "
        f"max_attempts {detail.max_attempts}"
        + (f", dedupe_key {detail.dedupe_key!r}" if detail.dedupe_key is not None else ""),
    )
    flow = detail.flow.lines(detail.kind, _when)
    if flow:
        facts.add_row("flow", Text("\n".join(flow), style="yellow"))
    facts.add_row("created", _when(p.get("created_at")))
    if p.get("run_at") is not None:
        facts.add_row("run at", _when(p["run_at"]))
    facts.add_row("started", _when(p.get("started_at")))
    facts.add_row("finished", _when(p.get("finished_at")))
    parts: list[RenderableType] = [facts]
    if detail.note:
        parts.append(Text(f"note: {detail.note}", style="bold yellow"))
    if detail.recent_errors:
        errors = Table(title="recent errors", title_justify="left", box=None, header_style="bold")
        errors.add_column("at", no_wrap=True)
        errors.add_column("seq", justify="right")
        errors.add_column("event", no_wrap=True)
        errors.add_column("attempt", justify="right")
        errors.add_column("error", overflow="fold")
        for e in detail.recent_errors:
            errors.add_row(_when(e["at"]), str(e["seq"]), e["event"], str(e["attempt"]), e["error"])
        parts.append(Text(""))
        parts.append(errors)
    return Group(*parts)


def workers_table(workers: Sequence[ops.WorkerRow]) -> RenderableType:
    if not workers:
        return Text("no registered workers")
    table = Table(header_style="bold", pad_edge=False, box=None, padding=(0, 1))
    for name in ("worker", "host", "pid", "version", "kinds", "concurrency"):
        table.add_column(
            name, no_wrap=name != "kinds", justify="right" if name == "pid" else "left"
        )
    table.add_column("started", no_wrap=True)
    table.add_column("last heartbeat", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for w in workers:
        table.add_row(
            w.worker_id,
            w.host,
            str(w.pid),
            w.version,
            ", ".join(w.kinds) or "-",
            str(w.concurrency),
            _when(w.started_at),
            f"{_when(w.last_heartbeat_at)} ({_duration(w.heartbeat_age_s)} ago)",
            Text("live", style="green") if w.live else Text("stale", style="red"),
        )
    return table


async def _snapshot(
    conn: asyncpg.Connection, job_id: UUID | None, *, limit: int | None, stale_after_s: float | None
) -> tuple[Snapshot, bool]:
    """What one redraw shows, and whether every shown job is terminal."""
    if job_id is not None:
        detail = await ops.job_detail(conn, job_id, stale_after_s=stale_after_s)
        return detail, detail.terminal
    jobs, total = await ops.list_jobs(conn, limit=limit)
    return (jobs, total, await ops.flow_limits(conn)), all(job.terminal for job in jobs)


def _render(snapshot: Snapshot, *, as_json: bool, bars: bool) -> RenderableType | str:
    if isinstance(snapshot, ops.JobDetail):
        return json.dumps(snapshot.as_json()) if as_json else job_view(snapshot)
    jobs, total, limits = snapshot
    if as_json:
        return json.dumps([job.as_json() for job in jobs])
    return jobs_table(jobs, total, bars=bars, limits=limits)


async def watch(
    conn: asyncpg.Connection,
    console: Console,
    job_id: UUID | None,
    *,
    limit: int | None,
    stale_after_s: float | None,
    interval_s: float,
    as_json: bool,
    once: bool,
    emit: Callable[[str], None] = print,
) -> None:
    """``status`` with or without ``--watch``: draw, and with ``once`` false redraw every
    ``interval_s`` until every shown job is terminal (Ctrl-C stops it earlier).

    Under ``--json`` each snapshot is one JSON document on one line (NDJSON when watching), so a
    script can follow a job without parsing a table.
    """
    snapshot, terminal = await _snapshot(conn, job_id, limit=limit, stale_after_s=stale_after_s)
    if as_json:
        emit(str(_render(snapshot, as_json=True, bars=False)))
        while not (once or terminal):
            await asyncio.sleep(interval_s)
            snapshot, terminal = await _snapshot(
                conn, job_id, limit=limit, stale_after_s=stale_after_s
            )
            emit(str(_render(snapshot, as_json=True, bars=False)))
        return
    if once:
        console.print(_render(snapshot, as_json=False, bars=False))
        return
    with Live(
        _render(snapshot, as_json=False, bars=True),
        console=console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        while not terminal:
            await asyncio.sleep(interval_s)
            snapshot, terminal = await _snapshot(
                conn, job_id, limit=limit, stale_after_s=stale_after_s
            )
            live.update(_render(snapshot, as_json=False, bars=True), refresh=True)
