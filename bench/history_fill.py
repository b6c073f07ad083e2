"""A finished history and a live queue, built fast: INSERT ... SELECT FROM generate_series
straight into chunkd's tables (bench/web_pages.py --history, tests/test_fresh_plans.py).

Nothing goes through the daemon or the public functions: ten million chunks through claims and
completions would take hours. What is written is what the functions would have written (the
same columns, the same invariants: a finished job's counters add up, every chunk of it has a
final attempt, the history's rows carry their job's expiry and sit in partitions the maintenance
would have made, chunkd.history_counts counts them), so every read sees a real queue. Job and
chunk ids continue from those handed out, and the identity sequences are moved past what this
writes, so live work may come before or after.

- :func:`fill_history`: finished jobs in the history: 90 % completed, 7 % partial_failure (one
  chunk failed for good, after a retried attempt), 3 % cancelled; three kinds; created over the
  last two days and expiring by the default policies; one job_finished event each.
- :func:`fill_live`: finished jobs not moved yet, pending, waiting and processing chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

__all__ = ["fill_history", "fill_live", "make_partitions"]

KINDS = ("mail-sync", "import", "export")

_JOBS = """
WITH base AS (
    SELECT coalesce(max(id), 0) AS id FROM (
        SELECT max(id) AS id FROM chunkd.jobs UNION ALL SELECT max(id) FROM chunkd.history_jobs
    ) x
), made AS (
    SELECT b.id + g AS id,
           (ARRAY['mail-sync', 'import', 'export'])[1 + g % 3] AS kind,
           CASE WHEN g % 100 < 90 THEN 'completed' WHEN g % 100 < 97 THEN 'partial_failure'
                ELSE 'cancelled' END AS status,
           now() - make_interval(secs => 172800.0 * g / $1) AS created_at
    FROM base b, generate_series(1, $1::int) g
)
INSERT INTO chunkd.history_jobs (id, public_id, kind, payload, max_attempts, priority,
    total_chunks, completed_chunks, failed_chunks, cancelled_chunks, cancelled_at, created_at,
    started_at, finished_at, open, appended_chunks, status, expires_at)
SELECT m.id, gen_random_uuid(), m.kind, jsonb_build_object('account', m.id), 3, 0, $2,
       CASE m.status WHEN 'completed' THEN $2 WHEN 'partial_failure' THEN $2 - 1
                     ELSE $2 / 2 END,
       CASE m.status WHEN 'partial_failure' THEN 1 ELSE 0 END,
       CASE m.status WHEN 'cancelled' THEN $2 - $2 / 2 ELSE 0 END,
       CASE m.status WHEN 'cancelled' THEN m.created_at + interval '2 seconds' END,
       m.created_at, m.created_at + interval '1 second', m.created_at + interval '2 seconds',
       false, 0, m.status,
       m.created_at + interval '2 seconds' + make_interval(secs => r.keep_s)
FROM made m
JOIN chunkd.retention r
  ON r.state = CASE m.status WHEN 'partial_failure' THEN 'failed' ELSE m.status END
ORDER BY m.id
"""

# The chunks of the jobs $1 <= id <= $2, each with its final state: completed first, then the
# failed one, then the cancelled ones (as a cancel leaves the chunks it took from the queue).
# Ids follow from the job's id and the seq ($3: the last chunk id before, $4: the first job's
# id; uuids from their md5), so the attempts and events below are made from the jobs alone,
# never reading back the chunks.
_STATES = """
SELECT j.*, s AS seq, $3::bigint + (j.id - $4::bigint) * j.total_chunks + s + 1 AS chunk_id,
       md5('queue' || ($3::bigint + (j.id - $4::bigint) * j.total_chunks + s + 1))::uuid
           AS queue_id,
       CASE WHEN s < j.completed_chunks THEN 'completed'
            WHEN s < j.completed_chunks + j.failed_chunks THEN 'failed'
            ELSE 'cancelled' END AS chunk_status,
       CASE WHEN s < j.completed_chunks THEN 1
            WHEN s < j.completed_chunks + j.failed_chunks THEN 2 ELSE 0 END AS chunk_attempts
FROM chunkd.history_jobs j
CROSS JOIN LATERAL generate_series(0, j.total_chunks - 1) s
WHERE j.id BETWEEN $1 AND $2
"""

_CHUNKS = """
WITH x AS (@STATES@)
INSERT INTO chunkd.history_chunks (id, job_id, seq, queue_id, chunk_id, payload, created_at,
    legacy, status, attempts, max_attempts, started_at, completed_at, error_message, worker_id,
    result, sync_job_id, kind, priority, expires_at)
SELECT x.chunk_id, x.id, x.seq, x.queue_id, md5('chunk' || x.chunk_id)::uuid,
       jsonb_build_object('page', x.seq), x.created_at, false, x.chunk_status, x.chunk_attempts,
       3, CASE WHEN x.chunk_status <> 'cancelled' THEN x.started_at END, x.finished_at,
       CASE x.chunk_status WHEN 'failed' THEN 'IMAP: connection reset' END,
       CASE WHEN x.chunk_status <> 'cancelled' THEN 'w1' END,
       CASE x.chunk_status WHEN 'completed' THEN jsonb_build_object('messages', x.seq % 50) END,
       x.public_id, x.kind, x.priority, x.expires_at
FROM x
"""

# One attempt per completed chunk; a failed chunk: a retried attempt, then the final failure;
# none for a cancelled one (its event says it was cancelled).
_ATTEMPTS = """
WITH x AS (@STATES@)
INSERT INTO chunkd.history_attempts (chunk_id, n, attempt, job_id, limited, worker_id,
    claimed_at, lease_expires_at, ended_at, outcome, final, result, error, legacy, delay_s,
    sync_job_id, queue_id, seq, kind, expires_at)
SELECT x.chunk_id, a.n, a.n, x.id, false, 'w1', x.started_at + make_interval(secs => a.n - 1),
       x.started_at + interval '1 minute', x.started_at + make_interval(secs => a.n - 0.5),
       CASE WHEN x.chunk_status = 'completed' THEN 'completed'
            WHEN a.n < x.chunk_attempts THEN 'retry_scheduled' ELSE 'failed' END,
       a.n = x.chunk_attempts,
       CASE x.chunk_status WHEN 'completed' THEN jsonb_build_object('messages', x.seq % 50) END,
       CASE WHEN x.chunk_status = 'failed' THEN 'IMAP: connection reset' END, false,
       CASE WHEN x.chunk_status = 'failed' AND a.n < x.chunk_attempts THEN 1.0 END,
       x.public_id, x.queue_id, x.seq, x.kind, x.expires_at
FROM x
CROSS JOIN LATERAL generate_series(1, x.chunk_attempts) a(n)
"""

_EVENTS = """
WITH x AS (@STATES@)
INSERT INTO chunkd.history_events (id, job_id, chunk_id, event, status, attempt, at, detail,
    v1, sync_job_id, queue_id, seq, job_kind, expires_at)
SELECT nextval(pg_get_serial_sequence('chunkd.events', 'id')), x.id, x.chunk_id, 'cancelled',
       'cancelled', 0, x.finished_at, NULL, false, x.public_id, x.queue_id, x.seq, x.kind,
       x.expires_at
FROM x WHERE x.chunk_status = 'cancelled'
UNION ALL
SELECT nextval(pg_get_serial_sequence('chunkd.events', 'id')), j.id, NULL, 'job_finished',
       j.status, 0, j.finished_at,
       jsonb_build_object(
           'sync_job_id', j.public_id, 'kind', j.kind, 'overall_status', j.status,
           'total_chunks', j.total_chunks, 'completed_chunks', j.completed_chunks,
           'failed_chunks', j.failed_chunks, 'cancelled_chunks', j.cancelled_chunks,
           'finished_at', j.finished_at, 'on_finish_job_id', NULL), false,
       j.public_id, NULL, NULL, j.kind, j.expires_at
FROM chunkd.history_jobs j
WHERE j.id BETWEEN $1 AND $2
"""

# (The chunks' states, in each statement that reads them: constant text.)
_CHUNKS, _ATTEMPTS, _EVENTS = (
    sql.replace("@STATES@", _STATES) for sql in (_CHUNKS, _ATTEMPTS, _EVENTS)
)

_COUNTS = """
INSERT INTO chunkd.history_counts AS hc (from_at, kind, status, jobs, chunks)
SELECT p.from_at, j.kind, j.status, count(*), sum(j.total_chunks)
FROM chunkd.history_jobs j
JOIN chunkd.history_partitions p ON j.expires_at >= p.from_at AND j.expires_at < p.to_at
WHERE j.id BETWEEN $1 AND $2
GROUP BY 1, 2, 3
ON CONFLICT (from_at, kind, status) DO UPDATE
SET jobs = hc.jobs + excluded.jobs, chunks = hc.chunks + excluded.chunks
"""

# The partitions the maintenance would have made for expiries over the next $1 seconds.
_PARTITIONS = """
SELECT count(*) FILTER (WHERE chunkd.create_history_partition(
           now() + make_interval(secs => g * chunkd.history_width_s()),
           chunkd.history_width_s()))
FROM generate_series(-2, ceil($1 / chunkd.history_width_s())::int + 1) g
WHERE NOT EXISTS (
    SELECT 1 FROM chunkd.history_partitions p
    WHERE now() + make_interval(secs => g * chunkd.history_width_s()) >= p.from_at
      AND now() + make_interval(secs => g * chunkd.history_width_s()) < p.to_at)
"""


async def make_partitions(conn: asyncpg.Connection) -> int:
    """The history partitions for every expiry from now to the longest policy (as the
    maintenance makes them when rows need them); returns how many were created."""
    longest = await conn.fetchval("SELECT max(keep_s) FROM chunkd.retention")
    created: int = await conn.fetchval(_PARTITIONS, longest)
    return created


async def fill_history(
    conn: asyncpg.Connection, jobs: int, chunks_per_job: int, *, batch_jobs: int = 20_000
) -> None:
    """``jobs`` finished jobs of ``chunks_per_job`` chunks each in the history (with their
    attempts, events, partitions and counts); in batches of ``batch_jobs`` jobs, one
    transaction each."""
    if chunks_per_job < 2:
        raise ValueError("chunks_per_job must be at least 2 (a failed job completes the rest)")
    await make_partitions(conn)
    first = await conn.fetchval(
        "SELECT coalesce(max(id), 0) + 1 FROM (SELECT max(id) AS id FROM chunkd.jobs"
        " UNION ALL SELECT max(id) FROM chunkd.history_jobs) x"
    )
    chunk_base = await conn.fetchval(_LAST_CHUNK_ID)
    await conn.execute(_JOBS, jobs, chunks_per_job)
    last = first + jobs - 1
    for lo in range(first, last + 1, batch_jobs):
        hi = min(last, lo + batch_jobs - 1)
        async with conn.transaction():
            for statement in (_CHUNKS, _ATTEMPTS, _EVENTS):
                await conn.execute(statement, lo, hi, chunk_base, first)
            await conn.execute(_COUNTS, lo, hi)
    await conn.execute("SELECT setval(pg_get_serial_sequence('chunkd.jobs', 'id'), $1)", last)
    await conn.execute(
        "SELECT setval(pg_get_serial_sequence('chunkd.chunks', 'id'), $1)",
        chunk_base + jobs * chunks_per_job,
    )


# The last chunk id handed out (live chunks, and the history's, which came from the same
# sequence): read from the sequence, not from the tables (the history has no index by id).
_LAST_CHUNK_ID = """
SELECT greatest(coalesce((SELECT max(id) FROM chunkd.chunks), 0),
                (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                 FROM chunkd.chunks_id_seq s))
"""


# The live jobs from id $1 on, numbered g from 1 in the order fill_live makes them; $2..$4: how
# many are finished, pending, waiting.
_NUMBERED = """
WITH p AS (SELECT $1::bigint AS first, $2::bigint AS done, $2::bigint + $3::bigint AS due,
                  $2::bigint + $3::bigint + $4::bigint AS waits),
x AS (
    SELECT c.id AS chunk_id, c.job_id, j.kind, j.id - p.first + 1 AS g, p.*
    FROM p, chunkd.jobs j JOIN chunkd.chunks c ON c.job_id = j.id
    WHERE j.id >= p.first
)
"""

_LIVE_JOBS = """
WITH p AS (SELECT $1::bigint AS total, $2::bigint AS done, $2::bigint + $3::bigint AS due),
j AS (
    INSERT INTO chunkd.jobs (kind, payload, total_chunks, completed_chunks, created_at,
                             started_at, finished_at)
    SELECT (ARRAY['mail-sync', 'import', 'export'])[1 + g % 3], jsonb_build_object('live', g), 1,
           CASE WHEN g <= p.done THEN 1 ELSE 0 END, now() - make_interval(secs => p.total - g),
           CASE WHEN g <= p.done OR g > p.due THEN now() END,
           CASE WHEN g <= p.done THEN now() END
    FROM p, generate_series(1, p.total) g
    ORDER BY g
    RETURNING id
)
INSERT INTO chunkd.chunks (job_id, seq, payload)
SELECT j.id, 0, '{}' FROM j ORDER BY j.id
"""

# Finished: a completed attempt; waiting: a failed one, retried in an hour; processing: an
# open one.
_LIVE_ATTEMPTS = """
INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id, lease_expires_at,
                             ended_at, outcome, final, error)
SELECT x.chunk_id, 1, 1, x.job_id, false, $5::text, now() + interval '1 hour',
       CASE WHEN x.g <= x.waits THEN now() END,
       CASE WHEN x.g <= x.done THEN 'completed' WHEN x.g <= x.waits THEN 'retry_scheduled' END,
       CASE WHEN x.g <= x.done THEN true WHEN x.g <= x.waits THEN false END,
       CASE WHEN x.g > x.done AND x.g <= x.waits THEN 'timeout' END
FROM x WHERE x.g <= x.done OR x.g > x.due
"""

_LIVE_READY = """
INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, turn)
SELECT x.chunk_id, x.job_id, 0, 0, x.kind, false, x.g FROM x WHERE x.g > x.done AND x.g <= x.due
"""

_LIVE_SCHEDULED = """
INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims, attempt,
                              run_at)
SELECT x.chunk_id, x.job_id, 0, 0, x.kind, false, 1, 1, now() + interval '1 hour'
FROM x WHERE x.g > x.due AND x.g <= x.waits
"""


async def fill_live(
    conn: asyncpg.Connection,
    *,
    finished: int,
    pending: int,
    waiting: int,
    processing: int,
    worker_id: str = "w1",
) -> None:
    """One-chunk jobs in the live tables, in this order of ids: ``finished`` completed and not
    moved yet, ``pending`` due now, ``waiting`` for a retry in an hour (a first attempt failed),
    ``processing`` under a lease of an hour held by ``worker_id``."""
    total = finished + pending + waiting + processing
    first = await conn.fetchval("SELECT nextval(pg_get_serial_sequence('chunkd.jobs', 'id')) + 1")
    await conn.execute(_LIVE_JOBS, total, finished, pending)
    counts = (first, finished, pending, waiting)
    await conn.execute(_NUMBERED + _LIVE_ATTEMPTS, *counts, worker_id)
    await conn.execute(_NUMBERED + _LIVE_READY, *counts)
    await conn.execute(_NUMBERED + _LIVE_SCHEDULED, *counts)
