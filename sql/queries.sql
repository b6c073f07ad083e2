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

-- name: claim_chunks
SELECT queue_id, chunk_id, parent_sync_job_id, seq, attempt, kind, payload, job_payload,
       lease_expires_at
FROM chunkd.claim_next_chunk_job_safe($1, $2, $3, $4);

-- name: complete_chunks
SELECT id FROM chunkd.complete_chunks($1, $2, $3, $4) AS id;

-- name: fail_chunk
SELECT chunkd.fail_chunk_job_safe($1, $2, $3, $4, $5, $6, $7, $8);

-- name: heartbeat_chunks
SELECT chunkd.heartbeat_chunks($1, $2, $3);

-- name: release_chunks
SELECT chunkd.release_chunks($1, $2);

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
