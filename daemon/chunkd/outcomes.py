"""Writing outcomes: completions in batches, failures one by one, never losing one to a blip.

A completion is queued only after its handler returned, and the worker awaits the commit of
its batch; a graceful stop drains the queue before it exits. Lost connections (a Postgres
restart, pg_terminate_backend) are retried with backoff; fencing makes a late retry harmless.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from uuid import UUID

import structlog

from chunkd.db import ClaimedRow, DatabaseError, Queue, retry_transient

__all__ = ["Outcomes", "ResultRejected"]

log = structlog.get_logger("chunkd.outcomes")

MAX_BATCH = 500


class ResultRejected(Exception):
    """The database refused a handler's result (e.g. a string jsonb cannot hold)."""


@dataclass
class _Pending:
    row: ClaimedRow
    result_json: str | None
    accepted: asyncio.Future[bool]


class Outcomes:
    def __init__(
        self, queue: Queue, worker_id: str, *, retry_base_s: float, retry_cap_s: float
    ) -> None:
        self._queue = queue
        self._worker_id = worker_id
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._buffer: list[_Pending] = []
        self._has_work = asyncio.Event()
        self._flushing = False

    async def complete(self, row: ClaimedRow, result_json: str | None) -> bool:
        """True when recorded; False when fenced out (the claim was lost meanwhile)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._buffer.append(_Pending(row, result_json, future))
        self._has_work.set()
        # Shielded: a worker cancelled at shutdown must not drop an outcome already produced.
        return await asyncio.shield(future)

    async def fail(
        self, row: ClaimedRow, error: str, *, retryable: bool, retry_in_s: float | None
    ) -> str | None:
        """The new status ('pending' = retry scheduled, 'failed'), or None when fenced out."""
        error = error.replace("\0", "")
        # Shielded like completions: a stop must not cut a failure report in half.
        return await asyncio.shield(self._fail(row, error, retryable, retry_in_s))

    async def _fail(
        self, row: ClaimedRow, error: str, retryable: bool, retry_in_s: float | None
    ) -> str | None:
        return await retry_transient(
            "fail_chunk",
            lambda: self._queue.fail(
                row.queue_id,
                self._worker_id,
                row.attempt,
                error,
                retryable=retryable,
                retry_in_s=retry_in_s,
                backoff_base_s=self._retry_base_s,
                backoff_cap_s=self._retry_cap_s,
            ),
        )

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def drain(self) -> None:
        """Waits until the flusher has written everything queued (graceful stop)."""
        while self._buffer or self._flushing:
            self._has_work.set()
            await asyncio.sleep(0.005)

    async def run(self) -> None:
        """The flusher task: one statement per batch of whatever accumulated meanwhile."""
        while True:
            await self._has_work.wait()
            await self.flush()

    async def flush(self) -> None:
        self._flushing = True
        try:
            await self._flush()
        finally:
            self._flushing = False

    async def _flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:MAX_BATCH]
            try:
                accepted = await self._complete(batch)
            except DatabaseError:
                # One value the database refuses must not poison the batch (and the flusher,
                # retrying it forever): write the batch one by one, and hand each refused
                # result back to its worker, which fails that chunk alone.
                accepted = set()
                for p in batch:
                    try:
                        accepted |= await self._complete([p])
                    except DatabaseError as exc:
                        if not p.accepted.done():
                            p.accepted.set_exception(ResultRejected(str(exc)))
            del self._buffer[: len(batch)]
            for p in batch:
                if not p.accepted.done():
                    p.accepted.set_result(p.row.queue_id in accepted)
        self._has_work.clear()

    async def _complete(self, batch: list[_Pending]) -> set[UUID]:
        return await retry_transient(
            "complete_chunks",
            lambda: self._queue.complete(
                self._worker_id,
                [p.row.queue_id for p in batch],
                [p.row.attempt for p in batch],
                [p.result_json for p in batch],
            ),
        )
