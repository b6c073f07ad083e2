"""chunkd: a durable chunk-processing daemon for PostgreSQL."""

from chunkd.app import App
from chunkd.chunk import Chunk, Continue, PermanentError, RetryLater, UndecodablePayloadError
from chunkd.client import (
    Progress,
    cancel,
    create_sync_job,
    create_sync_jobs,
    get_progress,
    retry_failed,
    wait,
)
from chunkd.errors import ConnectionLostError, InvalidInputError, JobNotFoundError
from chunkd.version import __version__

__all__ = [
    "App",
    "Chunk",
    "ConnectionLostError",
    "Continue",
    "InvalidInputError",
    "JobNotFoundError",
    "PermanentError",
    "Progress",
    "RetryLater",
    "UndecodablePayloadError",
    "__version__",
    "cancel",
    "create_sync_job",
    "create_sync_jobs",
    "get_progress",
    "retry_failed",
    "wait",
]
