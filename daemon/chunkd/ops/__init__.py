"""Operator actions on the queue (the CLI's and, later, the web dashboard's back end).

- :mod:`~chunkd.ops.input`: parsing enqueue input (JSON array or NDJSON);
- :mod:`~chunkd.ops.jobs`: enqueue, progress, retry, cancel, reap, purge;
- :mod:`~chunkd.ops.flow`: pause and resume, rate and concurrency limits;
- :mod:`~chunkd.ops.workers`: the registered daemons;
- :mod:`~chunkd.ops.errors`: server errors as one readable line.
"""

from chunkd.ops.errors import database_errors
from chunkd.ops.flow import (
    FlowLimit,
    JobFlow,
    flow_limits,
    format_rate,
    parse_rate,
    pause_job,
    pause_kind,
    resume_job,
    resume_kind,
    set_concurrency_limit,
    set_rate_limit,
)
from chunkd.ops.input import MAX_INPUT_BYTES, parse_chunks, parse_json_option
from chunkd.ops.jobs import (
    TERMINAL_STATUSES,
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
    "FlowLimit",
    "JobDetail",
    "JobFlow",
    "JobRow",
    "WorkerRow",
    "cancel_job",
    "database_errors",
    "enqueue",
    "flow_limits",
    "format_rate",
    "job_detail",
    "list_jobs",
    "list_workers",
    "parse_chunks",
    "parse_json_option",
    "parse_rate",
    "pause_job",
    "pause_kind",
    "purge_finished",
    "reap",
    "resume_job",
    "resume_kind",
    "retry_failed",
    "set_concurrency_limit",
    "set_rate_limit",
]
