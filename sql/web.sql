-- Statements of `chunkd web` only, one named block each ("-- name: NAME"), read by chunkd.web.
-- They read through the public SQL contract (the views chunk_processing_queue, chunk_events,
-- job_events, sync_jobs, chunked_sync_jobs, workers and the functions get_sync_job_progress,
-- queue_depth, and the read-only functions of sql/functions/progress.sql: search_sync_jobs,
-- sync_job_status_counts, kind_state, queue_depth_by_kind, in_flight_by_worker, job_flow), so
-- a role with SELECT on those views and EXECUTE on those functions runs every page; the
-- actions call retry_failed_chunks, cancel_sync_job, pause_sync_job, resume_sync_job,
-- pause_kind and resume_kind. Values are always bound parameters.

-- name: web_jobs_page
-- One page of jobs, newest first, matching the search $1 (NULL: all), optionally of one kind
-- ($2) and one overall status ($3); $4 rows from offset $5 (the columns of
-- chunk_processing_status, the label and the dedupe key). Throughput as get_sync_job_progress
-- computes it (terminal chunks that ran, per second since the start); starts_in_s: how long
-- until a delayed job's run_at.
SELECT s.parent_sync_job_id AS id, s.kind, s.label, s.dedupe_key, s.total_chunks,
       s.pending_chunks, s.processing_chunks, s.completed_chunks, s.failed_chunks,
       s.cancelled_chunks, s.overall_status, s.progress_percentage, s.created_at, s.started_at,
       s.finished_at,
       CASE WHEN s.started_at IS NULL THEN NULL
            ELSE round((s.completed_chunks + s.failed_chunks)::numeric
                       / greatest(extract(epoch FROM
                           coalesce(s.finished_at, now()) - s.started_at), 0.001), 2)
       END::float8 AS chunks_per_second,
       CASE WHEN s.run_at > now() THEN extract(epoch FROM s.run_at - now())::float8
       END AS starts_in_s
FROM chunkd.search_sync_jobs($1, $2, $3, $4, $5) s;

-- name: web_job_facets
-- How many jobs of kind $1 (NULL: any) are in each overall status.
SELECT c.overall_status, c.jobs FROM chunkd.sync_job_status_counts($1) c;

-- name: web_kind_state
-- Kind $1's pause and rate, and its chunks processing and pending (one row).
SELECT k.paused_at, k.per_second, k.burst, k.tokens, k.processing, k.pending, k.active_jobs
FROM chunkd.kind_state($1) k;

-- name: web_kinds
-- Every job kind, for the filter (the history's from its counts: never a scan of it).
SELECT k.kind FROM chunkd.sync_job_kinds() k ORDER BY k.kind;

-- name: web_job_progress
SELECT chunkd.get_sync_job_progress($1);

-- name: web_job_settings
-- A job's settings, the size of its payload (the payload itself only on request), and how
-- long until its run_at when that lies ahead.
SELECT j.kind, j.priority, j.max_concurrency, j.max_attempts, j.total_chunks, j.cancelled_at,
       j.created_at, j.run_at, j.dedupe_key, j.label, pg_column_size(j.payload) AS payload_bytes,
       CASE WHEN j.run_at > now() THEN extract(epoch FROM j.run_at - now())::float8
       END AS starts_in_s
FROM chunkd.sync_jobs j
WHERE j.id = $1;

-- name: web_job_flow
-- The flow controls that apply to job $1: its own, its concurrency key's, its kind's.
SELECT f.paused_at, f.max_per_second, f.burst, f.tokens, f.concurrency_key,
       f.key_max_concurrency, f.key_processing, f.kind_paused_at, f.kind_per_second,
       f.kind_burst, f.kind_tokens
FROM chunkd.job_flow($1) f;

-- name: web_job_events
-- The job's own events (paused, resumed, job_finished, ...), newest first: $2 at most.
SELECT e.at, e.event, e.status, e.worker_id, e.detail
FROM chunkd.job_events e
WHERE e.sync_job_id = $1
ORDER BY e.at DESC
LIMIT $2;

-- name: web_live_worker_for_kind
-- Is any live worker able to run kind $1? As ops_live_worker_for_kind: heard from within $2
-- seconds, or for $2 NULL within three of its own heartbeats ($3 seconds without them).
SELECT EXISTS (
    SELECT 1 FROM chunkd.workers w
    WHERE $1 = ANY (w.kinds)
      AND w.last_heartbeat_at >= now() - make_interval(
              secs => coalesce($2::float8, 3 * w.heartbeat_s, $3::float8)));

-- name: web_job_payload
-- As text: the page decodes it, and shows a placeholder for a payload too deep for Python.
SELECT j.payload::text FROM chunkd.sync_jobs j WHERE j.id = $1;

-- name: web_chunk_map
-- Every chunk's state as one character, in seq order: p pending (due), w waiting (a retry or a
-- later start), r processing, c completed, f failed, x cancelled.
SELECT count(*) AS chunks,
       coalesce(string_agg(
           CASE q.status
               WHEN 'pending' THEN CASE WHEN q.run_at > now() THEN 'w' ELSE 'p' END
               WHEN 'processing' THEN 'r'
               WHEN 'completed' THEN 'c'
               WHEN 'failed' THEN 'f'
               ELSE 'x'
           END, '' ORDER BY q.seq), '') AS states
FROM chunkd.chunk_processing_queue q
WHERE q.parent_sync_job_id = $1;

-- name: web_job_throughput
-- The audit trail of job $1 in buckets of $2 seconds from $3: chunks completed, and failed
-- attempts (retries, reaps and final failures), per bucket.
SELECT date_bin(make_interval(secs => $2), e.at, $3::timestamptz) AS bucket,
       count(*) FILTER (WHERE e.event = 'completed') AS completed,
       count(*) FILTER (WHERE e.event IN ('failed', 'retry_scheduled', 'reaped')) AS failed
FROM chunkd.chunk_events e
WHERE e.sync_job_id = $1 AND e.event IN ('completed', 'failed', 'retry_scheduled', 'reaped')
  AND e.at >= $3::timestamptz
GROUP BY 1
ORDER BY 1;

-- name: web_job_errors
-- The job's latest errors, newest first, with the chunk's position.
SELECT e.at, e.seq, e.event, e.attempt, e.worker_id, e.error
FROM chunkd.chunk_events e
WHERE e.sync_job_id = $1 AND e.error IS NOT NULL
ORDER BY e.at DESC
LIMIT $2;

-- name: web_chunk
-- One chunk of job $1 by its position $2.
SELECT q.id, q.chunk_id, q.seq, q.status, q.attempts, q.max_attempts, q.created_at,
       q.started_at, q.completed_at, q.run_at, q.lease_expires_at, q.worker_id, q.error_message,
       q.run_at > now() AS waiting
FROM chunkd.chunk_processing_queue q
WHERE q.parent_sync_job_id = $1 AND q.seq = $2;

-- name: web_chunk_events
-- The audit trail of one chunk (job $1, position $2), oldest first.
SELECT e.at, e.event, e.status, e.attempt, e.worker_id, e.error
FROM chunkd.chunk_events e
WHERE e.sync_job_id = $1 AND e.seq = $2
ORDER BY e.at, e.attempt;

-- name: web_chunk_payload
SELECT c.payload::text FROM chunkd.chunked_sync_jobs c WHERE c.sync_job_id = $1 AND c.seq = $2;

-- name: web_workers
-- Registered daemons with what each holds now; ages by the database clock; stale_after_s as
-- in ops_workers ($1 seconds, or three of its own heartbeats, $2 seconds without them).
SELECT w.worker_id, w.host, w.pid, w.version, w.kinds, w.concurrency, w.started_at,
       w.last_heartbeat_at,
       extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s,
       coalesce($1::float8, 3 * w.heartbeat_s, $2::float8) AS stale_after_s,
       coalesce(f.chunks, 0) AS in_flight
FROM chunkd.workers w
LEFT JOIN chunkd.in_flight_by_worker() f ON f.worker_id = w.worker_id
ORDER BY w.host, w.started_at, w.worker_id;

-- name: web_queue_depth
-- Live chunks by status: pending, paused, throttled, scheduled, processing.
SELECT d.status, d.chunks FROM chunkd.queue_depth() d;

-- name: web_queue_depth_by_kind
SELECT d.kind, d.status, d.chunks FROM chunkd.queue_depth_by_kind() d ORDER BY d.kind;

-- name: web_retry_failed_chunks
SELECT chunkd.retry_failed_chunks($1);

-- name: web_cancel_sync_job
SELECT chunkd.cancel_sync_job($1);

-- name: web_pause_sync_job
SELECT chunkd.pause_sync_job($1);

-- name: web_resume_sync_job
SELECT chunkd.resume_sync_job($1);

-- name: web_pause_kind
SELECT chunkd.pause_kind($1);

-- name: web_resume_kind
SELECT chunkd.resume_kind($1);
