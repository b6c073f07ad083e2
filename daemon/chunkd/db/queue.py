"""The queue API the daemon uses: one method per named statement of ``sql/queries.sql``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from chunkd.db.migrate import SchemaState, schema_state
from chunkd.db.schedules import ScheduleStore
from chunkd.db.sql_files import queries

__all__ = ["Claim", "ClaimedRow", "Queue", "RetentionRound", "WorkerRegistration"]


@dataclass(frozen=True, slots=True)
class WorkerRegistration:
    """A daemon's row in the workers registry, as it registers: its id, host, pid, chunkd
    version, handler kinds and ``--concurrency``."""

    worker_id: str
    host: str
    pid: int
    version: str
    kinds: tuple[str, ...]
    concurrency: int


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """One claimed chunk as the claim returns it; ``id`` is its internal key (outcomes use it),
    the uuids are its public identity. The payloads are JSON text as the database prints them
    (decoded only if a handler reads them, so every number stays exactly as stored).
    ``claim_n``: this claim's number among the chunk's claims (1: its first delivery; a retry,
    a snooze, a release or a reap hands it out again); ``traceparent``: its job's W3C trace
    context, or None (both for tracing)."""

    id: int
    queue_id: UUID
    chunk_id: UUID
    sync_job_id: UUID
    seq: int
    attempt: int
    kind: str
    payload_json: str
    job_payload_json: str
    lease_expires_at: datetime
    claim_n: int = 1
    traceparent: str | None = None

    def log_fields(self, worker_id: str) -> dict[str, object]:
        """The fields every per-chunk log line carries (ids as text), for ``worker_id``."""
        return {
            "sync_job_id": str(self.sync_job_id),
            "chunk_id": str(self.chunk_id),
            "queue_id": str(self.queue_id),
            "seq": self.seq,
            "attempt": self.attempt,
            "kind": self.kind,
            "worker_id": worker_id,
        }


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim returned: the chunks, and when rate limits held chunks back, how many
    seconds until the database expects tokens for this claimer (``wait_s``; None otherwise).
    ``wait_s`` -1: work under flow control waits for a free slot of this claimer (it was not
    claimed as prefetch): claim again when one frees."""

    rows: list[ClaimedRow]
    wait_s: float | None


@dataclass(frozen=True, slots=True)
class RetentionRound:
    """What one maintenance round did (``chunkd.retention_round``): ``ran`` False when another
    daemon's round held the lock; jobs and chunks moved to the history, jobs deleted because
    they had expired before they moved, partitions created and dropped; ``more``: work is left
    for the next round now."""

    ran: bool
    moved_jobs: int
    moved_chunks: int
    expired_jobs: int
    created_partitions: int
    dropped_partitions: int
    more: bool

    @property
    def did_something(self) -> bool:
        return any(
            (self.moved_chunks, self.moved_jobs, self.expired_jobs, self.created_partitions,
             self.dropped_partitions)
        )  # fmt: skip


class Queue:
    """The queue API the daemon uses: one method per named query, all values bound."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._q = queries()
        self.schedules = ScheduleStore(pool)

    async def claim(
        self,
        worker_id: str,
        batch_size: int,
        kinds: Sequence[str] | None,
        lease_s: float,
        *,
        waiting_s: float | None = None,
        slots: int | None = None,
    ) -> Claim:
        """Claims up to ``batch_size`` chunks of these kinds for ``lease_s`` seconds.

        ``waiting_s``: seconds until this claimer comes back anyway (a turn it was given by an
        earlier claim and still holds), so the database gives it no new one. ``slots``: how many
        of the batch can start at once (default all): the rest is prefetch, and takes no work
        under flow control (a job's or a key's slot, a rate token).
        """
        records = await self._pool.fetch(
            self._q["claim_batch"],
            worker_id,
            batch_size,
            list(kinds) if kinds is not None else None,
            lease_s,
            waiting_s,
            batch_size if slots is None else slots,
        )
        rows: list[ClaimedRow] = []
        wait_s: float | None = None
        for record in records:
            if record[0] is None:
                wait_s = float(record[10])
            else:
                r = record
                rows.append(
                    ClaimedRow(
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                        claim_n=r[11], traceparent=r[12],
                    )
                )  # fmt: skip
        return Claim(rows, wait_s)

    async def complete(
        self,
        worker_id: str,
        ids: Sequence[int],
        attempts: Sequence[int],
        results_json: Sequence[str | None],
    ) -> set[int]:
        """Returns the ids whose completion was accepted; the rest were fenced out."""
        rows = await self._pool.fetch(
            self._q["complete_attempts"],
            worker_id,
            list(ids),
            list(attempts),
            list(results_json),
        )
        return {row[0] for row in rows}

    async def complete_and_append(
        self,
        worker_id: str,
        chunk_id: int,
        attempt: int,
        result_json: str | None,
        chunks_json: str,
    ) -> int | None:
        """Completes one chunk and appends ``chunks_json`` (a JSON array) to its job, in one
        transaction; returns how many were appended, or None when fenced out (nothing
        changed). Raises DatabaseError when the chunks are refused (limits)."""
        appended: int | None = await self._pool.fetchval(
            self._q["complete_and_append"], worker_id, chunk_id, attempt, result_json, chunks_json
        )
        return appended

    async def fail(
        self,
        chunk_id: int,
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
            self._q["fail_attempt"],
            worker_id,
            chunk_id,
            attempt,
            error,
            retryable,
            retry_in_s,
            backoff_base_s,
            backoff_cap_s,
        )
        return status

    async def release(self, worker_id: str, ids: Sequence[int]) -> int:
        """Hands these claims back without spending their attempt; returns how many."""
        released: int = await self._pool.fetchval(self._q["release_attempts"], worker_id, list(ids))
        return released

    async def snooze(
        self,
        row: ClaimedRow,
        worker_id: str,
        reason: str,
        *,
        delay_s: float,
        max_snoozes: int,
        lease_s: float,
    ) -> str | None:
        """A handler's ``RetryLater``: the chunk runs again in ``delay_s`` seconds without
        spending its attempt, while it has been snoozed fewer than ``max_snoozes`` times;
        past that, a failure retried after ``delay_s``. ``lease_s``: the lease ``row`` was
        claimed with (with its ``lease_expires_at`` it fences on the claim itself). Returns
        'snoozed', 'pending' (retry scheduled), 'failed', or None when fenced out. Raises
        DatabaseError (a data error for a delay that is not a finite number >= 0)."""
        status: str | None = await self._pool.fetchval(
            self._q["snooze_attempt"],
            worker_id,
            row.id,
            row.attempt,
            reason,
            delay_s,
            max_snoozes,
            row.lease_expires_at,
            lease_s,
        )
        return status

    async def heartbeat(
        self, worker_id: str, claims: Sequence[tuple[int, int]], lease_s: float
    ) -> set[tuple[int, int]]:
        """Renews the leases of ``claims`` ((id, attempt) pairs) by ``lease_s`` seconds;
        returns those still held."""
        rows = await self._pool.fetch(
            self._q["renew_attempts"],
            worker_id,
            [claim[0] for claim in claims],
            [claim[1] for claim in claims],
            lease_s,
        )
        return {(row[0], row[1]) for row in rows}

    async def stop_worker(self, worker_id: str) -> int:
        """Releases every chunk the worker holds and removes its row, in one statement (a
        graceful stop; also catches a claim whose reply never arrived). Returns how many
        chunks were released."""
        async with self._pool.acquire() as conn:
            try:
                released: int = await conn.fetchval(self._q["stop_worker"], worker_id)
            finally:
                # The pool closes right after this: resetting the session on release would
                # cost one more round trip for nothing.
                conn.terminate()
        return released

    async def expire_connections(self) -> None:
        """Statements from now on run on new connections (after a failover, say)."""
        await self._pool.expire_connections()

    async def reap_expired(self) -> list[asyncpg.Record]:
        """Returns the chunks whose lease ran out, or whose dead worker claimed them, to the
        queue (or fails them for good, on their last attempt): one record each (sync_job_id,
        chunk_id, queue_id, seq, attempt, kind, worker_id, final, rule: ``'lease'`` or
        ``'worker'``, see ``chunkd.reap_attempts()``)."""
        return await self._pool.fetch(self._q["reap_expired"])

    async def retention_round(self, max_chunks: int) -> RetentionRound:
        """One maintenance round: finished jobs (up to ``max_chunks`` chunks) to the history,
        expired history partitions dropped; nothing when another daemon's round runs."""
        row = await self._pool.fetchrow(self._q["retention_round"], max_chunks)
        assert row is not None
        return RetentionRound(**dict(row))

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

    async def worker_alive(self, worker: WorkerRegistration, heartbeat_s: float) -> datetime:
        """This daemon's heartbeat in the workers registry (``heartbeat_s``: seconds between
        two), registering it again if its row was pruned; returns the database clock."""
        clock: datetime = await self._pool.fetchval(
            self._q["worker_alive"],
            worker.worker_id,
            heartbeat_s,
            worker.host,
            worker.pid,
            worker.version,
            list(worker.kinds),
            worker.concurrency,
        )
        return clock

    async def prune_workers(self, older_than_s: float) -> int:
        """Removes registry rows of daemons not heard from for ``older_than_s`` seconds that
        hold nothing; returns how many."""
        pruned: int = await self._pool.fetchval(self._q["prune_workers"], older_than_s)
        return pruned

    async def schema_state(self, timeout_s: float) -> SchemaState:
        """The schema versions applied and known (``/readyz``); a connection waited for at most
        ``timeout_s`` seconds. Raises ChunkdError when this role cannot read them."""
        async with self._pool.acquire(timeout=timeout_s) as conn:
            return await schema_state(conn)

    async def queue_depth(self) -> dict[str, int]:
        rows = await self._pool.fetch(self._q["queue_depth"])
        return {row["status"]: row["chunks"] for row in rows}

    async def next_due_in(self, kinds: Sequence[str] | None) -> float | None:
        due_in_s: float | None = await self._pool.fetchval(
            self._q["next_due_in"], list(kinds) if kinds is not None else None
        )
        return due_in_s

    async def job_finished_by(
        self, job: UUID, worker_id: str, chunk_ids: Sequence[int]
    ) -> asyncpg.Record | None:
        """Finished job ``job`` (kind, overall_status, the chunk counts, traceparent) if
        ``worker_id``'s claim of one of ``chunk_ids`` ended in the transaction that finished it;
        else None (tracing's job_finished, sent once per job by the daemon that finished it)."""
        row: asyncpg.Record | None = await self._pool.fetchrow(
            self._q["job_finished_by"], job, worker_id, list(chunk_ids)
        )
        return row
