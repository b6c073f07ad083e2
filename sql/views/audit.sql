-- The audit trail, per chunk and per job.

-- The per-chunk audit trail: 'enqueued' is the chunk row, 'claimed' and its outcome the attempts
-- row, 'cancelled' and 'retried' come from events, and rows written under schema version 1 are
-- kept as they were (events_v1). Job-level rows (job_finished, the pause and resume of a job or
-- of a kind, with who did it) are in job_events. A claim that spent no attempt ('released',
-- 'snoozed') shows the attempts spent after it; delay_s is the seconds until the chunk could
-- run again that a 'snoozed' or 'retry_scheduled' row asked for (NULL otherwise, and for rows
-- written before schema version 10).
CREATE OR REPLACE VIEW chunkd.chunk_events AS
SELECT c.queue_id, j.public_id AS sync_job_id, 'enqueued'::text AS event, 'pending'::text AS status,
       0 AS attempt, NULL::text AS worker_id, NULL::text AS error, c.created_at AS at,
       j.kind, NULL::float8 AS delay_s
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id
WHERE NOT c.legacy
UNION ALL
SELECT c.queue_id, j.public_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at, j.kind, NULL
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE NOT a.legacy
UNION ALL
SELECT c.queue_id, j.public_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome IN ('released', 'snoozed') THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at, j.kind, a.delay_s
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT c.queue_id, j.public_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at, j.kind,
       NULL
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id JOIN chunkd.chunks c ON c.id = e.chunk_id
UNION ALL
SELECT v.queue_id, v.sync_job_id, v.event, v.status, v.attempt, v.worker_id, v.error, v.at,
       j.kind, NULL
FROM chunkd.events_v1 v LEFT JOIN chunkd.jobs j ON j.public_id = v.sync_job_id
-- The history: the same rows from the tables finished jobs moved to (rows of schema version 1
-- among the events). Claims and outcomes join their chunk on expires_at too: a job's rows
-- share it, so each probe reads one partition.
UNION ALL
SELECT c.queue_id, j.public_id, 'enqueued', 'pending', 0, NULL, NULL, c.created_at, j.kind, NULL
FROM chunkd.history_chunks c JOIN chunkd.all_jobs j ON j.id = c.job_id
WHERE NOT c.legacy
UNION ALL
SELECT c.queue_id, j.public_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at, j.kind, NULL
FROM chunkd.history_chunks c
JOIN chunkd.history_attempts a ON a.chunk_id = c.id AND a.expires_at = c.expires_at
JOIN chunkd.all_jobs j ON j.id = c.job_id
WHERE NOT a.legacy
UNION ALL
SELECT c.queue_id, j.public_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome IN ('released', 'snoozed') THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at, j.kind, a.delay_s
FROM chunkd.history_chunks c
JOIN chunkd.history_attempts a ON a.chunk_id = c.id AND a.expires_at = c.expires_at
JOIN chunkd.all_jobs j ON j.id = c.job_id
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT c.queue_id, j.public_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at, j.kind,
       NULL
FROM chunkd.history_chunks c
JOIN chunkd.history_events e ON e.chunk_id = c.id AND e.expires_at = c.expires_at
JOIN chunkd.all_jobs j ON j.id = c.job_id;

CREATE OR REPLACE VIEW chunkd.job_events AS
SELECT j.public_id AS sync_job_id, e.event, e.status, e.detail, e.at,
       coalesce(j.kind, e.kind) AS kind, e.worker_id
FROM chunkd.events e LEFT JOIN chunkd.jobs j ON j.id = e.job_id
WHERE e.chunk_id IS NULL
UNION ALL
-- A finished job's own events moved with its row.
SELECT h.public_id, e.event, e.status, e.detail, e.at, h.kind, e.worker_id
FROM chunkd.history_events e
JOIN chunkd.history_jobs h ON h.id = e.job_id AND h.expires_at = e.expires_at
WHERE e.chunk_id IS NULL AND NOT e.v1;
