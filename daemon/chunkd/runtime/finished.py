"""Traced jobs' ends on their traces: the daemon whose outcome finished a traced job records
``job_finished`` there (:meth:`chunkd.observability.tracing.Tracing.job_finished`).

Runs only while the daemon traces. A job's end is announced by the transaction that finishes
it (``NOTIFY chunkd_job_finished '<job id> <status>'``, heard on a LISTEN connection of its
own); of the daemons that ran chunks of the job, the one whose claim of one of the chunks it
ran last ended in that transaction finds the job in ``chunkd.job_finished_by`` and records it,
the others find no row. A job
ended by ``chunkd cancel`` or by the reaper (its last chunk's worker is gone) gets no event:
its audit row and NOTIFY say it as always.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import structlog

from chunkd.db import DATABASE_ERRORS, Queue
from chunkd.observability.tracing import Tracing

__all__ = ["JOB_FINISHED_CHANNEL", "FinishedJobs"]

log = structlog.get_logger("chunkd.runtime.finished")

JOB_FINISHED_CHANNEL = "chunkd_job_finished"
#: Notifications waiting to be looked at; past this, more are dropped (spans are best effort).
_BACKLOG = 10_000


class FinishedJobs:
    """Hears ``chunkd_job_finished`` (:meth:`on_notify`, a Listener's callback) and records
    the end of each traced job this daemon finished (:meth:`run`, a daemon task)."""

    def __init__(self, queue: Queue, tracing: Tracing, *, worker_id: str) -> None:
        self._queue = queue
        self._tracing = tracing
        self._worker_id = worker_id
        self._heard: asyncio.Queue[tuple[UUID, list[int]]] = asyncio.Queue(_BACKLOG)

    def on_notify(self, payload: str) -> None:
        """``'<job id> <status>'``: looked at only for a traced job this daemon ran a chunk
        of; nothing is read from the database for any other."""
        try:
            job = UUID(payload.split(" ", 1)[0])
        except ValueError:
            return
        chunk_ids = self._tracing.ran(job)
        if chunk_ids:
            try:
                self._heard.put_nowait((job, chunk_ids))
            except asyncio.QueueFull:
                pass

    async def run(self) -> None:
        while True:
            job, chunk_ids = await self._heard.get()
            try:
                row = await self._queue.job_finished_by(job, self._worker_id, chunk_ids)
            except DATABASE_ERRORS as exc:
                log.warning("tracing.job_finished_failed", sync_job_id=str(job), error=str(exc))
                continue
            if row is not None:
                self._tracing.job_finished(job, dict(row))

    async def connected(self) -> None:
        """Nothing to catch up on after a reconnect: a job's end missed meanwhile is not
        announced on its trace."""
