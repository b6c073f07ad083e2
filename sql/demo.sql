-- Statements of `chunkd demo` only, one named block each ("-- name: NAME"), read by
-- chunkd.demo. Kept apart from queries.sql: the daemon never runs them. Values are always
-- bound parameters.

-- name: demo_create_job
-- The public contract, exactly as an application (or a Supabase edge function) calls it.
SELECT chunkd.create_sync_job($1, $2, $3, $4, $5, $6);

-- name: demo_progress
-- One row per demo job, in the order given: the contract's progress object, plus how many
-- retries (and snoozes: a rate limit's RetryLater) the audit trail has recorded for the job.
SELECT j.id,
       chunkd.get_sync_job_progress(j.id) AS progress,
       (SELECT count(*) FROM chunkd.chunk_events e
        WHERE e.sync_job_id = j.id AND e.event IN ('retry_scheduled', 'snoozed')) AS retries
FROM unnest($1::uuid[]) WITH ORDINALITY AS j(id, position)
ORDER BY j.position;

-- name: demo_status
-- The seed's monitoring query, verbatim once qualified.
SELECT * FROM chunkd.chunk_processing_status ORDER BY created_at;

-- name: demo_audit_summary
-- The audit trail in brief: how many transitions of each kind, in order of first occurrence.
SELECT event, count(*) AS transitions
FROM chunkd.chunk_events
GROUP BY event
ORDER BY min(at);

-- name: demo_failed_chunks
-- The chunks that failed for good, and why.
SELECT parent_sync_job_id, seq, attempts, error_message
FROM chunkd.chunk_processing_queue
WHERE status = 'failed'
ORDER BY parent_sync_job_id, seq;
