"""The queue API the daemon uses: one method per named statement of ``sql/queries.sql``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from chunkd.db.sql_files import queries

__all__ = ["ClaimedRow", "Queue"]


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    queue_id: UUID
    chunk_id: UUID
    sync_job_id: UUID
    seq: int
    attempt: int
    kind: str
    payload: Any
    job_payload: Any
    lease_expires_at: datetime


def _interval_s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


class Queue:
    """The queue API the daemon uses: one method per named query, all values bound."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._q = queries()

    async def claim(
        self, worker_id: str, batch_size: int, kinds: Sequence[str] | None, lease_s: float
    ) -> list[ClaimedRow]:
        rows = await self._pool.fetch(
            self._q["claim_chunks"],
            worker_id,
            batch_size,
            list(kinds) if kinds is not None else None,
            _interval_s(lease_s),
        )
        return [ClaimedRow(*row) for row in rows]

    async def complete(
        self,
        worker_id: str,
        queue_ids: Sequence[UUID],
        attempts: Sequence[int],
        results_json: Sequence[str | None],
    ) -> set[UUID]:
        """Returns the ids whose completion was accepted; the rest were fenced out."""
        rows = await self._pool.fetch(
            self._q["complete_chunks"],
            worker_id,
            list(queue_ids),
            list(attempts),
            list(results_json),
        )
        return {row[0] for row in rows}

    async def fail(
        self,
        queue_id: UUID,
        worker_id: str,
        attempt: int,
        error: str,
        *,
        retryable: bool,
        retry_in_s: float | None,
        backoff_base_s: float,
        backoff_cap_s: float,
    ) -> str | None:
        """Returns the new status ('pending' or 'failed'), or None when fenced out."""
        status: str | None = await self._pool.fetchval(
            self._q["fail_chunk"],
            queue_id,
            worker_id,
            attempt,
            error,
            retryable,
            _interval_s(retry_in_s) if retry_in_s is not None else None,
            _interval_s(backoff_base_s),
            _interval_s(backoff_cap_s),
        )
        return status

    async def heartbeat(self, worker_id: str, queue_ids: Sequence[UUID], lease_s: float) -> int:
        renewed: int = await self._pool.fetchval(
            self._q["heartbeat_chunks"], worker_id, list(queue_ids), _interval_s(lease_s)
        )
        return renewed

    async def release(self, worker_id: str, queue_ids: Sequence[UUID]) -> int:
        released: int = await self._pool.fetchval(
            self._q["release_chunks"], worker_id, list(queue_ids)
        )
        return released

    async def cleanup_stuck_chunks(self) -> int:
        reaped: int = await self._pool.fetchval(self._q["cleanup_stuck_chunks"])
        return reaped

    async def register_worker(
        self,
        worker_id: str,
        host: str,
        pid: int,
        version: str,
        kinds: Sequence[str],
        concurrency: int,
    ) -> None:
        await self._pool.execute(
            self._q["register_worker"], worker_id, host, pid, version, list(kinds), concurrency
        )

    async def worker_heartbeat(self, worker_id: str) -> None:
        await self._pool.execute(self._q["worker_heartbeat"], worker_id)

    async def deregister_worker(self, worker_id: str) -> None:
        await self._pool.execute(self._q["deregister_worker"], worker_id)

    async def queue_depth(self) -> dict[str, int]:
        rows = await self._pool.fetch(self._q["queue_depth"])
        return {row["status"]: row["chunks"] for row in rows}

    async def next_due_in(self, kinds: Sequence[str] | None) -> float | None:
        due_in_s: float | None = await self._pool.fetchval(
            self._q["next_due_in"], list(kinds) if kinds is not None else None
        )
        return due_in_s
