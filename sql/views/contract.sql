-- The seed's tables as views over the storage (docs/storage.md): sync_jobs, chunked_sync_jobs,
-- chunk_processing_queue, and the per-job summary chunk_processing_status. Each shows the live
-- tables and the finished history (docs/storage.md, "Retention and history") alike: a finished
-- job reads the same before and after its rows moved, until they expire.

-- Every job's row, live or in the history (status and expires_at: NULL while live), for the
-- functions that read one job by its id. The history's own rows name their job (sync_job_id):
-- no read of them joins this view.
CREATE OR REPLACE VIEW chunkd.all_jobs AS
SELECT j.id, j.public_id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority,
       j.total_chunks, j.completed_chunks, j.failed_chunks, j.cancelled_chunks, j.cancelled_at,
       j.created_at, j.started_at, j.finished_at, j.open, j.on_finish_kind, j.appended_chunks,
       j.run_at, j.dedupe_key, j.paused_at, j.max_per_second, j.concurrency_key, j.label,
       j.traceparent, NULL::text AS status, NULL::timestamptz AS expires_at
FROM chunkd.jobs j
UNION ALL
SELECT h.id, h.public_id, h.kind, h.payload, h.max_concurrency, h.max_attempts, h.priority,
       h.total_chunks, h.completed_chunks, h.failed_chunks, h.cancelled_chunks, h.cancelled_at,
       h.created_at, h.started_at, h.finished_at, h.open, h.on_finish_kind, h.appended_chunks,
       h.run_at, h.dedupe_key, h.paused_at, h.max_per_second, h.concurrency_key, h.label,
       h.traceparent, h.status, h.expires_at
FROM chunkd.history_jobs h;

CREATE OR REPLACE VIEW chunkd.sync_jobs AS
SELECT j.public_id AS id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority,
       j.total_chunks, j.cancelled_at, j.created_at, j.started_at, j.finished_at, j.run_at,
       j.dedupe_key, j.paused_at, j.max_per_second, j.concurrency_key, j.label
FROM chunkd.jobs j
UNION ALL
SELECT h.public_id, h.kind, h.payload, h.max_concurrency, h.max_attempts, h.priority,
       h.total_chunks, h.cancelled_at, h.created_at, h.started_at, h.finished_at, h.run_at,
       h.dedupe_key, h.paused_at, h.max_per_second, h.concurrency_key, h.label
FROM chunkd.history_jobs h;

CREATE OR REPLACE VIEW chunkd.chunked_sync_jobs AS
SELECT c.chunk_id AS id, j.public_id AS sync_job_id, c.seq, c.payload
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id
UNION ALL
SELECT c.chunk_id, c.sync_job_id, c.seq, c.payload
FROM chunkd.history_chunks c;

-- A chunk's state, derived from where its rows are: in ready or scheduled = pending; an open
-- attempt = processing; cancelled if a cancel took it from the queue (even after an operator
-- retry of a failed attempt); otherwise the outcome of its last attempt if that was final (or
-- its outcome from schema version 1), and cancelled if it left the queue without one.
CREATE OR REPLACE VIEW chunkd.chunk_state AS
SELECT
    c.id,
    c.job_id,
    c.seq,
    CASE
        WHEN p.attempt IS NOT NULL THEN 'pending'
        WHEN la.n IS NOT NULL AND la.ended_at IS NULL THEN 'processing'
        WHEN EXISTS (SELECT 1 FROM chunkd.events e
                     WHERE e.chunk_id = c.id AND e.event = 'cancelled') THEN 'cancelled'
        WHEN la.n IS NOT NULL AND la.final THEN
            CASE la.outcome WHEN 'completed' THEN 'completed' WHEN 'cancelled' THEN 'cancelled'
                            ELSE 'failed' END
        WHEN la.n IS NULL AND lo.status IS NOT NULL AND lo.completed_at IS NOT NULL THEN lo.status
        ELSE 'cancelled'
    END AS status,
    coalesce(p.attempt, la.attempt, lo.attempt, 0) AS attempts,
    coalesce(p.claims, la.n, lo.attempt, 0) AS claims,
    p.run_at,
    coalesce(la.claimed_at, lo.started_at) AS started_at,
    CASE WHEN la.n IS NOT NULL THEN la.ended_at ELSE lo.completed_at END AS ended_at,
    CASE WHEN la.n IS NOT NULL THEN la.error ELSE lo.error END AS error,
    coalesce(la.worker_id, lo.worker_id) AS worker_id,
    CASE WHEN la.ended_at IS NULL THEN la.lease_expires_at END AS lease_expires_at,
    CASE WHEN la.n IS NOT NULL THEN la.result ELSE lo.result END AS result
FROM chunkd.chunks c
LEFT JOIN LATERAL (
    SELECT now() AS run_at, r.attempt, r.claims FROM chunkd.ready r WHERE r.chunk_id = c.id
    UNION ALL
    SELECT s.run_at, s.attempt, s.claims FROM chunkd.scheduled s WHERE s.chunk_id = c.id
) p ON true
LEFT JOIN LATERAL (
    SELECT a.* FROM chunkd.attempts a WHERE a.chunk_id = c.id ORDER BY a.n DESC LIMIT 1
) la ON true
LEFT JOIN chunkd.legacy_outcomes lo ON lo.chunk_id = c.id;

CREATE OR REPLACE VIEW chunkd.chunk_processing_queue AS
SELECT
    c.queue_id AS id,
    c.chunk_id,
    j.public_id AS parent_sync_job_id,
    s.status,
    s.attempts,
    j.max_attempts,
    c.created_at,
    s.started_at,
    CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN s.ended_at END AS completed_at,
    s.error AS error_message,
    s.worker_id,
    coalesce(s.run_at, c.created_at) AS run_at,
    s.lease_expires_at,
    s.result,
    c.seq,
    j.kind,
    j.priority
FROM chunkd.chunks c
JOIN chunkd.jobs j ON j.id = c.job_id
JOIN chunkd.chunk_state s ON s.id = c.id
UNION ALL
-- A finished chunk's state as it was when it moved (its run_at: its creation, as above).
SELECT c.queue_id, c.chunk_id, c.sync_job_id, c.status, c.attempts, c.max_attempts,
       c.created_at, c.started_at, c.completed_at, c.error_message, c.worker_id, c.created_at,
       NULL, c.result, c.seq, c.kind, c.priority
FROM chunkd.history_chunks c;

CREATE OR REPLACE VIEW chunkd.chunk_processing_status AS
SELECT
    j.public_id AS parent_sync_job_id,
    j.kind,
    j.total_chunks,
    c.pending::int AS pending_chunks,
    (j.total_chunks - c.pending - j.completed_chunks - j.failed_chunks
     - j.cancelled_chunks)::int AS processing_chunks,
    j.completed_chunks,
    j.failed_chunks,
    j.cancelled_chunks,
    CASE
        WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN j.finished_at IS NULL THEN
            CASE WHEN j.paused_at IS NOT NULL
                      OR EXISTS (SELECT 1 FROM chunkd.kind_flow k
                                 WHERE k.kind = j.kind AND k.paused_at IS NOT NULL) THEN 'paused'
                 WHEN j.started_at IS NOT NULL THEN 'processing'
                 WHEN j.run_at > now() THEN 'scheduled'
                 ELSE 'pending' END
        WHEN j.failed_chunks > 0 THEN 'partial_failure'
        WHEN j.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END AS overall_status,
    coalesce(round((j.completed_chunks + j.failed_chunks + j.cancelled_chunks) * 100.0
                   / nullif(j.total_chunks, 0), 2), 0) AS progress_percentage,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.run_at
FROM chunkd.jobs j
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
           + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id) AS pending
) c
UNION ALL
-- A finished job: nothing pending, its status as the CASE above gave it when it moved.
SELECT h.public_id, h.kind, h.total_chunks, 0,
       (h.total_chunks - h.completed_chunks - h.failed_chunks - h.cancelled_chunks)::int,
       h.completed_chunks, h.failed_chunks, h.cancelled_chunks, h.status,
       coalesce(round((h.completed_chunks + h.failed_chunks + h.cancelled_chunks) * 100.0
                      / nullif(h.total_chunks, 0), 2), 0),
       h.created_at, h.started_at, h.finished_at, h.run_at
FROM chunkd.history_jobs h;
