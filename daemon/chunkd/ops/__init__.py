"""Operator actions on the queue (the CLI's and, later, the web dashboard's back end).

- :mod:`~chunkd.ops.input`: parsing enqueue input (JSON array or NDJSON);
- :mod:`~chunkd.ops.jobs`: enqueue, progress, retry, cancel, reap, purge;
- :mod:`~chunkd.ops.workers`: the registered daemons;
- :mod:`~chunkd.ops.errors`: server errors as one readable line.
"""

from chunkd.ops.errors import database_errors
from chunkd.ops.input import MAX_INPUT_BYTES, parse_chunks, parse_json_option
from chunkd.ops.jobs import (
    TERMINAL_STATUSES,
    Enqueued,
    JobDetail,
    JobRow,
    cancel_job,
    enqueue,
    job_detail,
    list_jobs,
    purge_finished,
    reap,
    retry_failed,
)
from chunkd.ops.workers import WorkerRow, list_workers

__all__ = [
    "MAX_INPUT_BYTES",
    "TERMINAL_STATUSES",
    "Enqueued",
    "JobDetail",
    "JobRow",
    "WorkerRow",
    "cancel_job",
    "database_errors",
    "enqueue",
    "job_detail",
    "list_jobs",
    "list_workers",
    "parse_chunks",
    "parse_json_option",
    "purge_finished",
    "reap",
    "retry_failed",
]
