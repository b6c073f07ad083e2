"""Operator actions on the queue (the CLI's and, later, the web dashboard's back end).

- :mod:`~chunkd.ops.input`: parsing enqueue input (JSON array or NDJSON);
- :mod:`~chunkd.ops.jobs`: enqueue, progress, retry, cancel, reap, purge;
- :mod:`~chunkd.ops.flow`: pause and resume, rate and concurrency limits;
- :mod:`~chunkd.ops.growing`: open jobs (append, close) and waiting for a job to finish;
- :mod:`~chunkd.ops.schedules`: recurring schedules;
- :mod:`~chunkd.ops.workers`: the registered daemons;
- :mod:`~chunkd.ops.retention`: how long finished jobs are kept;
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
from chunkd.ops.growing import JOB_FINISHED_CHANNEL, append, close, wait
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
from chunkd.ops.retention import (
    MAX_RETENTION_S,
    RETENTION_STATES,
    Policy,
    format_keep,
    retention_policies,
    set_retention,
)
from chunkd.ops.schedules import (
    ScheduleRow,
    add_schedule,
    list_schedules,
    pause_schedule,
    remove_schedule,
    resume_schedule,
)
from chunkd.ops.workers import WorkerRow, list_workers

__all__ = [
    "JOB_FINISHED_CHANNEL",
    "MAX_INPUT_BYTES",
    "MAX_RETENTION_S",
    "RETENTION_STATES",
    "TERMINAL_STATUSES",
    "Enqueued",
    "FlowLimit",
    "JobDetail",
    "JobFlow",
    "JobRow",
    "Policy",
    "ScheduleRow",
    "WorkerRow",
    "add_schedule",
    "append",
    "cancel_job",
    "close",
    "database_errors",
    "enqueue",
    "flow_limits",
    "format_keep",
    "format_rate",
    "job_detail",
    "list_jobs",
    "list_schedules",
    "list_workers",
    "parse_chunks",
    "parse_json_option",
    "parse_rate",
    "pause_job",
    "pause_kind",
    "pause_schedule",
    "purge_finished",
    "reap",
    "remove_schedule",
    "resume_job",
    "resume_kind",
    "resume_schedule",
    "retention_policies",
    "retry_failed",
    "set_concurrency_limit",
    "set_rate_limit",
    "set_retention",
    "wait",
]
