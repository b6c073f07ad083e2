-- The audit trail, per chunk and per job.

-- The per-chunk audit trail: 'enqueued' is the chunk row, 'claimed' and its outcome the attempts
-- row, 'cancelled' and 'retried' come from events, and rows written under schema version 1 are
-- kept as they were (events_v1). Job-level rows (job_finished, the pause and resume of a job or
-- of a kind, with who did it) are in job_events. A claim that spent no attempt ('released',
-- 'snoozed') shows the attempts spent after it; delay_s is the seconds until the chunk could
-- run again that a 'snoozed' or 'retry_scheduled' row asked for (NULL otherwise, and for rows
-- written before schema version 11); seq: the chunk's position in its job. A claim joins its job
-- through its chunk (the same job): a job's claims are then read through the chunks' index.
CREATE OR REPLACE VIEW chunkd.chunk_events AS
SELECT c.queue_id, j.public_id AS sync_job_id, 'enqueued'::text AS event, 'pending'::text AS status,
       0 AS attempt, NULL::text AS worker_id, NULL::text AS error, c.created_at AS at,
       j.kind, NULL::float8 AS delay_s, c.seq
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id
WHERE NOT c.legacy
UNION ALL
SELECT c.queue_id, j.public_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at, j.kind, NULL, c.seq
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = c.job_id
WHERE NOT a.legacy
UNION ALL
SELECT c.queue_id, j.public_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome IN ('released', 'snoozed') THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at, j.kind, a.delay_s, c.seq
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = c.job_id
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT c.queue_id, j.public_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at, j.kind,
       NULL, c.seq
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id JOIN chunkd.chunks c ON c.id = e.chunk_id
UNION ALL
SELECT v.queue_id, v.sync_job_id, v.event, v.status, v.attempt, v.worker_id, v.error, v.at,
       j.kind, NULL, c.seq
FROM chunkd.events_v1 v
LEFT JOIN chunkd.jobs j ON j.public_id = v.sync_job_id
LEFT JOIN chunkd.chunks c ON c.queue_id = v.queue_id
-- The history: the same rows from the tables finished jobs moved to (rows of schema version 1
-- among the events), each read from one table: its rows name their job and chunk.
UNION ALL
SELECT c.queue_id, c.sync_job_id, 'enqueued', 'pending', 0, NULL, NULL, c.created_at, c.kind,
       NULL, c.seq
FROM chunkd.history_chunks c
WHERE NOT c.legacy
UNION ALL
SELECT a.queue_id, a.sync_job_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at, a.kind, NULL, a.seq
FROM chunkd.history_attempts a
WHERE NOT a.legacy
UNION ALL
SELECT a.queue_id, a.sync_job_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome IN ('released', 'snoozed') THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at, a.kind, a.delay_s, a.seq
FROM chunkd.history_attempts a
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT e.queue_id, e.sync_job_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at,
       e.job_kind, NULL, e.seq
FROM chunkd.history_events e
WHERE e.queue_id IS NOT NULL;

CREATE OR REPLACE VIEW chunkd.job_events AS
SELECT j.public_id AS sync_job_id, e.event, e.status, e.detail, e.at,
       coalesce(j.kind, e.kind) AS kind, e.worker_id
FROM chunkd.events e LEFT JOIN chunkd.jobs j ON j.id = e.job_id
WHERE e.chunk_id IS NULL
UNION ALL
-- A finished job's own events moved with its row.
SELECT e.sync_job_id, e.event, e.status, e.detail, e.at, e.job_kind, e.worker_id
FROM chunkd.history_events e
WHERE e.queue_id IS NULL;
