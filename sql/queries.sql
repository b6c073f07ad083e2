-- Runtime statements of chunkd, one named block each ("-- name: NAME"), loaded once by
-- chunkd.sql_files.queries() and used as queries["NAME"]. Values are always bound parameters.

-- name: migrate_lock
-- Serialises concurrent `chunkd migrate` runs (session lock: held across the per-file transactions).
SELECT pg_advisory_lock(hashtext('chunkd.migrate'));

-- name: migrate_unlock
SELECT pg_advisory_unlock(hashtext('chunkd.migrate'));

-- name: migrate_bootstrap
CREATE SCHEMA IF NOT EXISTS chunkd;
REVOKE ALL ON SCHEMA chunkd FROM PUBLIC;
CREATE TABLE IF NOT EXISTS chunkd.schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON chunkd.schema_migrations FROM PUBLIC;
-- Lets a role with only EXECUTE grants (the worker role) check the version at start-up.
CREATE OR REPLACE FUNCTION chunkd.schema_versions() RETURNS int[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT coalesce(array_agg(m.version ORDER BY m.version), '{}') FROM chunkd.schema_migrations m;
END;
REVOKE ALL ON FUNCTION chunkd.schema_versions() FROM PUBLIC;

-- name: applied_versions
-- Through a function, so a role with only EXECUTE grants (the worker role) can check it.
SELECT unnest(chunkd.schema_versions()) AS version;

-- name: schema_exists
-- to_regclass does not raise when the schema was never migrated.
SELECT to_regclass('chunkd.schema_migrations') IS NOT NULL;

-- name: record_version
INSERT INTO chunkd.schema_migrations (version, name) VALUES ($1, $2);

-- name: ping
-- The listener's liveness check: a connection that died silently fails this.
SELECT 1;

-- name: claim_chunks
-- `id` is the chunk's internal key: outcomes, heartbeats and releases use it.
SELECT id, queue_id, chunk_id, sync_job_id, seq, attempt, kind, payload, job_payload,
       lease_expires_at
FROM chunkd.claim_chunks($1, $2, $3, $4);

-- name: complete_attempts
SELECT id FROM chunkd.complete_attempts($1, $2, $3, $4) AS id;

-- name: complete_and_append
-- A continuation: the completion and the chunks it appends, fenced together (NULL: fenced out).
SELECT chunkd.complete_and_append($1, $2, $3, $4::jsonb, $5::jsonb);

-- name: fail_attempt
SELECT chunkd.fail_attempt($1, $2, $3, $4, $5, $6, $7, $8);

-- name: renew_leases
-- The ids whose lease was renewed: a held id missing here is no longer ours.
SELECT id FROM chunkd.renew_leases($1, $2, $3) AS id;

-- name: release_attempts
-- $2 NULL releases every chunk this worker holds.
SELECT chunkd.release_attempts($1, $2);

-- name: cleanup_stuck_chunks
SELECT chunkd.cleanup_stuck_chunks();

-- name: register_worker
SELECT chunkd.register_worker($1, $2, $3, $4, $5, $6);

-- name: worker_heartbeat
SELECT chunkd.worker_heartbeat($1);

-- name: deregister_worker
SELECT chunkd.deregister_worker($1);

-- name: next_due_in
-- Seconds until the earliest pending chunk is due (armed as a timer at start-up and after a
-- reconnect; NULL when nothing is pending).
SELECT chunkd.next_due_in($1);

-- name: queue_depth
-- status in (pending, scheduled, processing) and how many chunks; sampled by the metrics task.
SELECT status, chunks FROM chunkd.queue_depth();

-- Schedules (chunkd.runtime.schedules fires them; chunkd.db.schedules runs these)

-- name: schedule_clock
SELECT clock_timestamp();

-- name: schedules_due
SELECT id, name, cron, timezone, next_fire_at FROM chunkd.schedules_due($1, $2);

-- name: next_schedule_at
SELECT chunkd.next_schedule_at();

-- name: plan_schedule
SELECT chunkd.plan_schedule($1, $2, $3);

-- name: fire_schedule
SELECT outcome, sync_job_id FROM chunkd.fire_schedule($1, $2, $3, $4);

-- Operator commands
-- (chunkd enqueue/status/retry/cancel/reap/purge/workers; chunkd.ops runs them.)

-- name: ops_create_job
-- $1: the job object (create_sync_job's arguments by name); $2: seconds from now until it may
-- start, by the database clock (`--in`), or NULL. Whether the job was created, or an unfinished
-- one with the same dedupe key returned.
SELECT j.sync_job_id, j.created
FROM chunkd.create_jobs(
    jsonb_build_array($1::jsonb || CASE WHEN $2::float8 IS NULL THEN '{}'::jsonb
                                        ELSE jsonb_build_object(
                                            'run_at', now() + make_interval(secs => $2))
                                   END),
    true) j;

-- name: ops_append_chunks
SELECT chunkd.append_chunks($1, $2::jsonb);

-- name: ops_close_sync_job
SELECT chunkd.close_sync_job($1);

-- name: ops_job_state
-- `chunkd wait`: the job's overall status and whether it is finished (NULL: no such job).
SELECT s.overall_status, j.finished_at IS NOT NULL AS finished
FROM chunkd.jobs j JOIN chunkd.chunk_processing_status s ON s.parent_sync_job_id = j.public_id
WHERE j.public_id = $1;

-- name: ops_create_schedule
SELECT chunkd.create_schedule($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9, $10);

-- name: ops_drop_schedule
SELECT chunkd.drop_schedule($1);

-- name: ops_pause_schedule
SELECT chunkd.pause_schedule($1);

-- name: ops_resume_schedule
SELECT chunkd.resume_schedule($1);

-- name: ops_schedules
SELECT s.name, s.cron, s.timezone, s.kind, s.dedupe, s.paused_at, s.next_fire_at,
       s.last_fired_at, j.public_id AS last_job_id, s.last_error
FROM chunkd.schedules s LEFT JOIN chunkd.jobs j ON j.id = s.last_job_id
ORDER BY s.name;

-- name: ops_recent_job_ids
-- The newest jobs first ($1 = how many; NULL = all) and how many jobs there are in all.
SELECT j.id, count(*) OVER () AS total_jobs
FROM chunkd.sync_jobs j
ORDER BY j.created_at DESC, j.id
LIMIT $1;

-- name: ops_job_status_rows
-- Filtered by job id so the view's GROUP BY reads only these jobs' chunks.
SELECT s.parent_sync_job_id, s.kind, s.total_chunks, s.pending_chunks, s.processing_chunks,
       s.completed_chunks, s.failed_chunks, s.cancelled_chunks, s.overall_status,
       s.progress_percentage, s.created_at, s.started_at, s.finished_at, s.run_at
FROM chunkd.chunk_processing_status s
WHERE s.parent_sync_job_id = ANY ($1::uuid[])
ORDER BY s.created_at DESC, s.parent_sync_job_id;

-- name: ops_job_progress
SELECT chunkd.get_sync_job_progress($1);

-- name: ops_job_settings
SELECT j.priority, j.max_concurrency, j.max_attempts, j.dedupe_key
FROM chunkd.sync_jobs j WHERE j.id = $1;

-- name: ops_recent_errors
-- The job's latest failures, retries and reaps, newest first, with the chunk's position: from
-- the attempts that carry an error (a partial index holds only those), and from the audit rows
-- written under schema version 1.
SELECT e.at, e.seq, e.event, e.attempt, e.worker_id, e.error
FROM (
    SELECT a.ended_at AS at, c.seq, a.outcome AS event, a.attempt, a.worker_id, a.error
    FROM chunkd.jobs j
    JOIN chunkd.attempts a ON a.job_id = j.id AND a.error IS NOT NULL
    JOIN chunkd.chunks c ON c.id = a.chunk_id
    WHERE j.public_id = $1
    UNION ALL
    SELECT v.at, c.seq, v.event, v.attempt, v.worker_id, v.error
    FROM chunkd.events_v1 v
    JOIN chunkd.chunks c ON c.queue_id = v.queue_id
    WHERE v.sync_job_id = $1 AND v.error IS NOT NULL
) e
ORDER BY e.at DESC
LIMIT $2;

-- name: ops_live_worker_for_kind
-- Is any worker that heartbeated within $2 able to run kind $1?
SELECT EXISTS (
    SELECT 1 FROM chunkd.workers w
    WHERE $1 = ANY (w.kinds) AND w.last_heartbeat_at > now() - $2::interval);

-- name: ops_retry_failed_chunks
SELECT chunkd.retry_failed_chunks($1);

-- name: ops_cancel_sync_job
SELECT chunkd.cancel_sync_job($1);

-- name: ops_purge_finished_jobs
SELECT chunkd.purge_finished_jobs($1);

-- name: ops_workers
-- Heartbeat ages by the database clock, so the client's clock does not matter.
SELECT w.worker_id, w.host, w.pid, w.version, w.kinds, w.concurrency, w.started_at,
       w.last_heartbeat_at,
       extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s
FROM chunkd.workers w
ORDER BY w.host, w.started_at, w.worker_id;

-- Python client (chunkd.client, chunkd.client.sync): the same statements for asyncpg and
-- psycopg (through its raw cursors, which take $n placeholders). Casts on every parameter, so
-- each driver sends what the function takes; jsonb comes back as text, decoded by the client.

-- name: client_create_sync_job
SELECT chunkd.create_sync_job($1::text, $2::jsonb, $3::jsonb, $4::int, $5::int, $6::int,
                              $7::timestamptz, $8::text);

-- name: client_create_sync_jobs
-- Ids in input order.
SELECT t.id FROM chunkd.create_sync_jobs($1::jsonb) WITH ORDINALITY AS t(id, n) ORDER BY t.n;

-- name: client_get_progress
SELECT chunkd.get_sync_job_progress($1::uuid)::text;

-- name: client_cancel
SELECT chunkd.cancel_sync_job($1::uuid);

-- name: client_retry_failed
SELECT chunkd.retry_failed_chunks($1::uuid);
