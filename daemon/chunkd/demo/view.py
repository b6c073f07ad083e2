"""What ``chunkd demo`` shows: the live progress view and the final report.

Everything shown comes from the database (``get_sync_job_progress``, the status view, the
audit table), not from the daemon's memory: the demo teaches the queries an operator uses.
On a terminal the view is a rich ``Live`` display; elsewhere (CI logs, pipes) it prints one
plain line per job every second, so the output stays readable as a log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["TERMINAL_STATUSES", "JobState", "ProgressView", "print_report"]

TERMINAL_STATUSES = frozenset({"completed", "partial_failure", "cancelled"})
PLAIN_INTERVAL_S = 1.0

EVENT_MEANINGS = {
    "enqueued": "chunk rows written by create_sync_job()",
    "claimed": "taken by a worker under a lease (one per attempt)",
    "completed": "handler returned; outcome written by the lease holder",
    "retry_scheduled": "transient error: back to pending after a jittered backoff",
    "snoozed": "rate limited (RetryLater): back after the delay asked for, attempt not spent",
    "failed": "failed for good (permanent error or out of attempts)",
    "released": "handed back unfinished at shutdown, attempt not spent",
    "reaped": "lease expired (worker died): back to pending",
    "cancelled": "its job was cancelled",
    "retried": "failed chunk put back by retry_failed_chunks()",
}


@dataclass(frozen=True)
class JobState:
    """One job's row of the live view: a label plus ``get_sync_job_progress()`` output."""

    label: str
    progress: Mapping[str, Any]
    retries: int

    @property
    def done(self) -> bool:
        return self.progress.get("overall_status") in TERMINAL_STATUSES

    @property
    def terminal_chunks(self) -> int:
        p = self.progress
        return int(p["completed_chunks"]) + int(p["failed_chunks"]) + int(p["cancelled_chunks"])

    def rate_text(self) -> str:
        rate = self.progress.get("chunks_per_second")
        return f"{float(rate):.1f} chunks/s" if rate is not None else "- chunks/s"

    def eta_text(self) -> str:
        if self.done:
            return "done"
        eta = self.progress.get("eta_seconds")
        return f"ETA {float(eta):.1f}s" if eta is not None else "ETA -"


class ProgressView:
    """Per-job bars, counts, chunks/s and ETA, redrawn from the latest database readings."""

    def __init__(self, console: Console, footer: str) -> None:
        self._console = console
        self._footer = footer
        self._jobs: list[JobState] = []
        self._started = time.monotonic()
        self._live: Live | None = None
        self._last_plain = 0.0
        self._unprinted = False

    def __enter__(self) -> ProgressView:
        self._started = time.monotonic()
        if self._console.is_terminal:
            self._live = Live(self, console=self._console, refresh_per_second=8)
            self._live.__enter__()
        else:
            self._console.print(f"progress view started ({self._footer})", markup=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        elif self._unprinted:
            self._print_plain()

    def update(self, jobs: Sequence[JobState]) -> None:
        self._jobs = list(jobs)
        self._unprinted = True
        if self._live is None and time.monotonic() - self._last_plain >= PLAIN_INTERVAL_S:
            self._print_plain()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def _print_plain(self) -> None:
        self._last_plain = time.monotonic()
        self._unprinted = False
        for job in self._jobs:
            p = job.progress
            self._console.print(
                f"[{self.elapsed_s:5.1f}s] {job.label}: {job.terminal_chunks}/{p['total_chunks']}"
                f" ({float(p['progress_percentage'] or 0):.1f}%), {p['failed_chunks']} failed,"
                f" {job.retries} retried, {job.rate_text()}, {job.eta_text()},"
                f" {p['overall_status']}",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )

    def __rich__(self) -> Group:
        grid = Table.grid(padding=(0, 1))
        for _ in range(8):
            grid.add_column(no_wrap=True)
        for job in self._jobs:
            p = job.progress
            failed = int(p["failed_chunks"])
            grid.add_row(
                Text(job.label, style="bold"),
                ProgressBar(
                    total=float(p["total_chunks"]), completed=job.terminal_chunks, width=28
                ),
                f"{job.terminal_chunks}/{p['total_chunks']}",
                f"{float(p['progress_percentage'] or 0):5.1f}%",
                Text(f"{failed} failed", style="red" if failed else "dim"),
                Text(f"{job.retries} retried", style="yellow" if job.retries else "dim"),
                job.rate_text(),
                Text(job.eta_text(), style="green" if job.done else ""),
            )
        title = Text("live progress: SELECT chunkd.get_sync_job_progress(job_id)", style="dim")
        footer = Text(f"elapsed {self.elapsed_s:.1f}s · {self._footer}", style="dim")
        return Group(title, grid, footer)


def _cell(value: object) -> str:
    if value is None:
        return "∅"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    return str(value)


def print_report(
    console: Console,
    labels: Mapping[UUID, str],
    status_rows: Sequence[Mapping[str, Any]],
    audit_rows: Sequence[Mapping[str, Any]],
    failed_rows: Sequence[Mapping[str, Any]],
) -> None:
    """The final state, as an operator would query it: the status view, audit and failures."""
    # Transposed (one column per job, like psql's \x): the view has 13 columns, too many
    # to read side by side in a terminal.
    status = Table(title="SELECT * FROM chunkd.chunk_processing_status", title_justify="left")
    status.add_column("column", style="bold")
    for row in status_rows:
        status.add_column(labels.get(row["parent_sync_job_id"], "other job"), overflow="fold")
    if status_rows:
        for column in status_rows[0].keys():
            style = "bold" if column == "overall_status" else ""
            status.add_row(column, *(Text(_cell(row[column]), style=style) for row in status_rows))
    console.print(status)

    audit = Table(
        title="Audit trail: SELECT event, count(*) FROM chunkd.chunk_events GROUP BY event",
        title_justify="left",
    )
    audit.add_column("event", style="bold")
    audit.add_column("transitions", justify="right")
    audit.add_column("meaning", style="dim")
    for row in audit_rows:
        audit.add_row(
            Text(row["event"]), str(row["transitions"]), EVENT_MEANINGS.get(row["event"], "")
        )
    console.print(audit)

    _print_story(console, labels, status_rows, audit_rows)
    for row in failed_rows:
        label = labels.get(row["parent_sync_job_id"], "other job")
        console.print(
            Text.assemble(
                ("failed for good", "red"),
                f": {label} chunk seq {row['seq']} after {row['attempts']} attempt(s): "
                f"{row['error_message']}",
            ),
            soft_wrap=True,
        )


def _print_story(
    console: Console,
    labels: Mapping[UUID, str],
    status_rows: Sequence[Mapping[str, Any]],
    audit_rows: Sequence[Mapping[str, Any]],
) -> None:
    """Two or three sentences on what the tables show (retries, fairness)."""
    events = {row["event"]: int(row["transitions"]) for row in audit_rows}
    lines = []
    for row in status_rows:
        label = labels.get(row["parent_sync_job_id"], "other job")
        took = ""
        if row["finished_at"] is not None:
            took = f" in {(row['finished_at'] - row['created_at']).total_seconds():.1f}s"
        lines.append(
            f"{label}: {row['overall_status']}{took}: {row['completed_chunks']} of "
            f"{row['total_chunks']} chunks completed, {row['failed_chunks']} failed for good."
        )
    retries, snoozes = events.get("retry_scheduled", 0), events.get("snoozed", 0)
    lines.append(
        f"{retries} transient error(s) (connection resets) were retried after a backoff and "
        f"{snoozes} rate-limited page(s) waited as long as asked without spending an attempt; "
        "a failed chunk never held up the others, and the small job enqueued behind the big "
        "one was not kept waiting for it (jobs of equal priority take turns)."
    )
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)
