-- Runtime statements of chunkd, one named block each ("-- name: NAME"), loaded once by
-- chunkd.sql_files.queries() and used as queries["NAME"]. Values are always bound parameters.
--
-- Every built-in is called as pg_catalog.NAME: chunkd pins search_path on its own connections,
-- but not through a transaction pooler (which refuses it as a startup parameter), and an
-- unqualified call can resolve to a better-matching function another role put in a schema on
-- the caller's search_path (CVE-2018-1058). tests/test_search_path.py checks every block.

-- name: migrate_lock
-- Serialises concurrent `chunkd migrate` runs (session lock: held across the per-file transactions).
SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext('chunkd.migrate'));

-- name: migrate_unlock
SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('chunkd.migrate'));

-- name: lock_try
-- First in each try of an operator action or a migration step (chunkd.db.locks): a lock wait
-- of this transaction lasts at most $1 (lock_timeout, e.g. '50ms'), and the chunkd functions
-- that retry inside (pause_sync_job, pause_kind) keep trying for at most $2 seconds
-- (chunkd.lock_wait).
SELECT pg_catalog.set_config('lock_timeout', $1, true),
       pg_catalog.set_config('chunkd.lock_wait', $2, true);

-- name: lock_blockers
-- The sessions in the way of the locks an operator action or a migration step wants. $1: the
-- relations, in the order the work takes them ('chunkd.ready'; 'chunkd.*': every table and
-- view of schema chunkd); $2: the mode wanted on each, as pg_locks spells it ('ShareLock',
-- ...), or 'row' for rows of it (then: every session holding a lock that row locks come with,
-- RowShareLock and up); $3: only sessions whose transaction has been open that many seconds
-- (or whose age this role may not see). One row per session (`transaction`: its virtual
-- transaction id, which its next transaction does not share), with the lock most surely in the
-- way (held before queued ahead, one that conflicts with a wanted mode before one that comes
-- with row locks, then on the relation wanted first, the strongest) and, in `locks`, every lock
-- of it in the way in that order ('RowExclusiveLock on chunkd.ready'). Sessions holding locks
-- first, then those queued ahead; among them, the one in the way of the relation wanted first
-- (row locks aside), then the oldest transaction. pg_stat_activity shows state and times of another role's
-- session only to members of pg_read_all_stats (NULL otherwise); the query text is never read.
WITH modes AS (
    -- (wanted, the modes held that conflict with it, weakest first)
    VALUES ('AccessShareLock', '{AccessExclusiveLock}'::text[]),
           ('RowShareLock', '{ExclusiveLock,AccessExclusiveLock}'),
           ('RowExclusiveLock', '{ShareLock,ShareRowExclusiveLock,ExclusiveLock,'
                                'AccessExclusiveLock}'),
           ('ShareUpdateExclusiveLock', '{ShareUpdateExclusiveLock,ShareLock,'
                                        'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}'),
           ('ShareLock', '{RowExclusiveLock,ShareUpdateExclusiveLock,ShareRowExclusiveLock,'
                         'ExclusiveLock,AccessExclusiveLock}'),
           ('ShareRowExclusiveLock', '{RowExclusiveLock,ShareUpdateExclusiveLock,ShareLock,'
                                     'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}'),
           ('ExclusiveLock', '{RowShareLock,RowExclusiveLock,ShareUpdateExclusiveLock,ShareLock,'
                             'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}'),
           ('AccessExclusiveLock', '{AccessShareLock,RowShareLock,RowExclusiveLock,'
                                   'ShareUpdateExclusiveLock,ShareLock,ShareRowExclusiveLock,'
                                   'ExclusiveLock,AccessExclusiveLock}'),
           ('row', '{RowShareLock,RowExclusiveLock,ShareUpdateExclusiveLock,ShareLock,'
                   'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}')
), conflicts AS (
    SELECT m.column1 AS wanted, m.column2 AS held FROM modes m
), wanted AS (
    SELECT c.oid AS relid, ($2::text[])[i] AS mode, i AS ord
    FROM pg_catalog.generate_subscripts($1::text[], 1) AS i
    JOIN pg_catalog.pg_class c
      ON c.oid = pg_catalog.to_regclass(($1::text[])[i])
         OR (($1::text[])[i] = 'chunkd.*' AND c.relkind IN ('r', 'p', 'v', 'm')
             AND c.relnamespace = (SELECT n.oid FROM pg_catalog.pg_namespace n
                                   WHERE n.nspname = 'chunkd'))
), hits AS (
    -- Each lock in the way, once (a relation may be wanted twice: by name and by 'chunkd.*').
    SELECT l.pid, l.virtualtransaction, l.mode, l.granted,
           l.relation::pg_catalog.regclass::text AS relation,
           pg_catalog.bool_and(w.mode = 'row') AS row_only, pg_catalog.min(w.ord) AS ord,
           pg_catalog.max(pg_catalog.array_position(x.held, l.mode)) AS strength
    FROM wanted w
    JOIN conflicts x ON x.wanted = w.mode
    JOIN pg_catalog.pg_locks l
      ON l.locktype = 'relation' AND l.relation = w.relid AND l.mode = ANY (x.held)
         AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                           WHERE d.datname = pg_catalog.current_database())
    WHERE l.pid <> pg_catalog.pg_backend_pid()
      AND (w.mode <> 'row' OR l.granted)
    GROUP BY l.pid, l.virtualtransaction, l.mode, l.granted, l.relation
), found AS (
    SELECT h.pid, h.virtualtransaction,
           (pg_catalog.array_agg(h.mode ORDER BY h.granted DESC, h.row_only, h.ord,
                                 h.strength DESC))[1] AS mode,
           (pg_catalog.array_agg(h.relation ORDER BY h.granted DESC, h.row_only, h.ord,
                                 h.strength DESC))[1] AS relation,
           pg_catalog.bool_or(h.granted) AS granted,
           pg_catalog.min(h.ord) FILTER (WHERE h.granted AND NOT h.row_only) AS held_ord,
           pg_catalog.array_agg(h.mode || ' on ' || h.relation
                                ORDER BY h.granted DESC, h.row_only, h.ord, h.strength DESC)
               AS locks
    FROM hits h
    GROUP BY h.pid, h.virtualtransaction
)
SELECT f.pid, a.usename AS role, a.application_name, a.state,
       extract(epoch FROM pg_catalog.clock_timestamp() - a.state_change)::float8 AS state_s,
       extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start)::float8 AS xact_s,
       f.mode, f.relation, f.granted, f.virtualtransaction AS transaction, f.locks
FROM found f
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = f.pid
WHERE a.xact_start IS NULL
   OR a.xact_start <= pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $3)
ORDER BY f.granted DESC, f.held_ord, a.xact_start NULLS LAST, f.pid;

-- name: pin_search_path
-- First in every migration's transaction: whatever the connection's setting, built-ins and
-- unqualified names in the migration files resolve in pg_catalog only.
SET LOCAL search_path = pg_catalog, pg_temp;

-- name: pin_search_path_session
-- After connecting through a session pooler that refuses search_path as a startup parameter.
SET search_path = pg_catalog, pg_temp;

-- name: backend_pid
-- Run as COPY (simple protocol): a pooler announces a pid of its own at connect, not this one.
SELECT pg_catalog.pg_backend_pid()

-- name: idle_session_timeout
-- In milliseconds (0: off; no row before PostgreSQL 14). The listener pings well within it.
SELECT s.setting::int8 FROM pg_catalog.pg_settings s WHERE s.name = 'idle_session_timeout';

-- name: migrate_preflight
-- What `chunkd migrate` checks before it writes anything: a writable primary, who owns the
-- schema (if it exists), anything in it owned by another role, whether this role may create it.
WITH schema AS (
    SELECT n.oid, n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'chunkd'
), owned AS (
    SELECT pg_catalog.format('table %s', c.oid::pg_catalog.regclass) AS what, c.relowner AS owner
    FROM pg_catalog.pg_class c JOIN schema s ON c.relnamespace = s.oid
    UNION ALL
    SELECT pg_catalog.format('function %s', p.oid::pg_catalog.regprocedure), p.proowner
    FROM pg_catalog.pg_proc p JOIN schema s ON p.pronamespace = s.oid
    UNION ALL
    SELECT pg_catalog.format('type %s', t.oid::pg_catalog.regtype), t.typowner
    FROM pg_catalog.pg_type t JOIN schema s ON t.typnamespace = s.oid
)
SELECT current_user AS role,
       pg_catalog.current_database() AS database,
       pg_catalog.current_setting('transaction_read_only') = 'on' AS read_only,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE') AS can_create,
       (SELECT pg_catalog.pg_get_userbyid(s.nspowner) FROM schema s) AS schema_owner,
       (SELECT pg_catalog.format('%s (owned by %s)', o.what, pg_catalog.pg_get_userbyid(o.owner))
        FROM owned o CROSS JOIN schema s
        WHERE o.owner <> s.nspowner
        ORDER BY o.what
        LIMIT 1) AS foreign_object;

-- name: migrate_create_schema
-- Only when the schema does not exist: CREATE SCHEMA needs CREATE on the database even with
-- IF NOT EXISTS, and the owner of a schema a DBA created beforehand may not have it.
CREATE SCHEMA chunkd;

-- name: migrate_bootstrap
REVOKE ALL ON SCHEMA chunkd FROM PUBLIC;
CREATE TABLE IF NOT EXISTS chunkd.schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON chunkd.schema_migrations FROM PUBLIC;
-- Lets a role with only EXECUTE grants (the worker role) check the version at start-up.
CREATE OR REPLACE FUNCTION chunkd.schema_versions() RETURNS int[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT coalesce(pg_catalog.array_agg(m.version ORDER BY m.version), '{}') FROM chunkd.schema_migrations m;
END;
REVOKE ALL ON FUNCTION chunkd.schema_versions() FROM PUBLIC;

-- name: schema_access
-- Whether the schema exists and what this role may do with it (needs no privilege at all).
SELECT current_user AS role,
       pg_catalog.current_database() AS database,
       n.oid IS NOT NULL AS schema_exists,
       coalesce(pg_catalog.has_schema_privilege(n.oid, 'USAGE'), false) AS usage,
       CASE WHEN pg_catalog.has_schema_privilege(n.oid, 'USAGE')
            THEN pg_catalog.to_regclass('chunkd.schema_migrations') IS NOT NULL
       END AS migrated,
       (SELECT pg_catalog.has_function_privilege(p.oid, 'EXECUTE')
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = n.oid AND p.proname = 'schema_versions') AS can_read_version
FROM (SELECT) AS one
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = 'chunkd';

-- name: applied_versions
-- Through a function, so a role with only EXECUTE grants (the worker role) can check it.
SELECT pg_catalog.unnest(chunkd.schema_versions()) AS version;

-- name: daemon_preflight
-- Before `chunkd run` writes anything: the daemon's functions ($1) this role may not execute
-- (as regprocedure text), and whether the database takes writes.
SELECT ARRAY(SELECT p.oid::pg_catalog.regprocedure::text
             FROM pg_catalog.pg_proc p
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'chunkd' AND p.proname = ANY ($1::text[])
               AND NOT pg_catalog.has_function_privilege(p.oid, 'EXECUTE')
             ORDER BY 1) AS not_executable,
       pg_catalog.current_setting('transaction_read_only') = 'on' AS read_only,
       pg_catalog.pg_is_in_recovery() AS in_recovery;

-- name: current_role
SELECT current_user;

-- name: record_version
INSERT INTO chunkd.schema_migrations (version, name) VALUES ($1, $2);

-- name: definitions_recorded
-- The definition files applied and their checksums (migrate, as the schema's owner).
SELECT d.path, d.checksum, d.fingerprint, d.applied_by FROM chunkd.schema_definitions d;

-- name: definitions_applied
-- The same through a function, for a role with only EXECUTE grants (`chunkd run`'s check,
-- `chunkd doctor`).
SELECT d.path, d.checksum, d.fingerprint, d.applied_by FROM chunkd.schema_definitions() d;

-- name: definitions_catalog
-- Per definitions file ($1 paths, $2 kinds, $3 names: one element per object a file creates),
-- the MD5 of the catalog's own text of those objects (every overload of a function name) and
-- the objects missing from the catalog.
WITH wanted AS (
    SELECT pg_catalog.unnest($1::text[]) AS path, pg_catalog.unnest($2::text[]) AS kind,
           pg_catalog.unnest($3::text[]) AS name
), defs AS (
    SELECT 'function' AS kind, p.proname::text AS name, pg_catalog.pg_get_functiondef(p.oid) AS def
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'chunkd'
    UNION ALL
    SELECT 'view', c.relname::text, pg_catalog.pg_get_viewdef(c.oid)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'chunkd' AND c.relkind = 'v'
    UNION ALL
    SELECT 'trigger', t.tgname::text, pg_catalog.pg_get_triggerdef(t.oid)
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'chunkd' AND NOT t.tgisinternal
)
SELECT w.path,
       pg_catalog.md5(pg_catalog.string_agg(coalesce(d.def, ''), E'\n'
                                            ORDER BY w.kind, w.name, d.def)) AS fingerprint,
       pg_catalog.array_remove(pg_catalog.array_agg(CASE WHEN d.def IS NULL
                                                         THEN w.kind || ' ' || w.name END
                                                    ORDER BY w.kind, w.name), NULL) AS missing
FROM wanted w
LEFT JOIN defs d ON d.kind = w.kind AND d.name = w.name
GROUP BY w.path;

-- name: definitions_sql_bodies
-- The catalog's text of the SQL-standard bodies (BEGIN ATOMIC, RETURN) of the functions named
-- $1: PostgreSQL prints such a body back differently once re-read from its own print (a
-- column alias `AS text` added in a UNION branch), so `chunkd migrate` re-applies each until
-- it prints the same, as a dump and restore would leave it.
SELECT p.oid::pg_catalog.regprocedure::text AS function, pg_catalog.pg_get_functiondef(p.oid) AS def
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'chunkd' AND p.prosqlbody IS NOT NULL AND p.proname = ANY ($1::text[]);

-- name: definitions_record
-- $1 paths, $2 checksums, $3 fingerprints, $4 the chunkd version applying them.
INSERT INTO chunkd.schema_definitions
SELECT pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[]),
       pg_catalog.unnest($3::text[]), pg_catalog.now(), $4
ON CONFLICT ON CONSTRAINT schema_definitions_pkey DO UPDATE
SET checksum = excluded.checksum, fingerprint = excluded.fingerprint,
    applied_at = pg_catalog.now(), applied_by = excluded.applied_by;

-- name: definitions_refingerprint
-- After a versioned migration changed what a definition reads (a column of a view), the
-- catalog's text of the untouched files may change too: record it, keeping their checksums.
UPDATE chunkd.schema_definitions d SET fingerprint = r.fingerprint
FROM (SELECT pg_catalog.unnest($1::text[]) AS path, pg_catalog.unnest($2::text[]) AS fingerprint) r
WHERE d.path = r.path AND d.fingerprint <> r.fingerprint;

-- name: definitions_forget
-- Files no longer shipped (their objects were dropped by a versioned migration).
DELETE FROM chunkd.schema_definitions d WHERE NOT d.path = ANY ($1::text[]);

-- name: revoke_public
-- Nothing in schema chunkd is granted to PUBLIC, whatever a definition created.
REVOKE ALL ON ALL TABLES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkd FROM PUBLIC;

-- name: schema_objects
-- Every function (as regprocedure text) and view (as regclass text) of schema chunkd: what a
-- migration drops is the difference before and after.
SELECT 'FUNCTION' AS kind, p.oid::pg_catalog.regprocedure::text AS object
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'chunkd'
UNION ALL
SELECT 'TABLE', c.oid::pg_catalog.regclass::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'chunkd' AND c.relkind = 'v';

-- name: schema_grants
-- The privileges roles other than the owner hold on chunkd's functions and views, so a
-- definition dropped and created again (or replaced under a new signature) gets them back.
SELECT 'FUNCTION' AS kind, p.oid::pg_catalog.regprocedure::text AS object,
       r.rolname AS grantee, a.privilege_type AS privilege, a.is_grantable AS grantable
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
WHERE n.nspname = 'chunkd' AND a.grantee <> p.proowner
UNION ALL
SELECT 'TABLE', c.oid::pg_catalog.regclass::text, r.rolname, a.privilege_type, a.is_grantable
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
WHERE n.nspname = 'chunkd' AND c.relkind = 'v' AND a.grantee <> c.relowner;

-- name: grant_statement
-- A GRANT of one privilege ($1 kind FUNCTION or TABLE, $2 the object as the catalog prints
-- it, $3 the privilege, $4 the role, $5 with grant option), quoted by the server.
SELECT pg_catalog.format('GRANT %s ON %s %s TO %I%s', $3::text, $1::text, $2::text, $4::text,
                         CASE WHEN $5::boolean THEN ' WITH GRANT OPTION' ELSE '' END);

-- name: live_workers_of_other_versions
-- Daemons of another chunkd version than $1 that count as running: their last heartbeat is
-- within three of their heartbeat intervals (heartbeat_s, the reaper's rule), or within $2
-- seconds for a daemon that does not say how often it heartbeats (0.1, 0.2: NULL). heartbeat_s
-- is read through to_jsonb: before schema version 10 the column does not exist. `heartbeat_s`:
-- that interval (NULL: the $2 rule); `left_s`: how long it keeps counting as running.
SELECT w.worker_id, w.version, w.heartbeat_s,
       extract(epoch FROM w.last_heartbeat_at + pg_catalog.make_interval(secs => w.window_s)
                          - pg_catalog.now())::float8 AS left_s
FROM (
    SELECT x.worker_id, x.version, x.last_heartbeat_at, h.heartbeat_s,
           coalesce(3 * h.heartbeat_s, $2) AS window_s
    FROM chunkd.workers x
    CROSS JOIN LATERAL (SELECT (pg_catalog.to_jsonb(x) ->> 'heartbeat_s')::float8
                               AS heartbeat_s) h
) w
WHERE w.version <> $1
  AND w.last_heartbeat_at > pg_catalog.now() - pg_catalog.make_interval(secs => w.window_s)
ORDER BY w.version, w.worker_id;

-- name: ping
-- The listener's liveness check: a connection that died silently fails this.
SELECT 1;

-- name: claim_batch
-- `id` is the chunk's internal key: outcomes, heartbeats and releases use it. The payloads as
-- the text jsonb prints, so handlers get every number exactly as stored. A row with id NULL
-- carries only wait_s: rate limits held chunks back, come back in wait_s seconds; -1: work
-- under flow control waits for a free slot, claim again when one frees. $5: seconds
-- until this claimer comes back anyway (a turn it holds), or NULL. $6: how many of the $2 can
-- start now (the rest is prefetch: no work under flow control there). claim_n and traceparent
-- are for tracing: the chunk's claim number (1: first delivery) and its job's trace context.
SELECT id, queue_id, chunk_id, sync_job_id, seq, attempt, kind, payload::text,
       job_payload::text, lease_expires_at, wait_s, claim_n, traceparent
FROM chunkd.claim_batch($1, $2, $3, $4, $5, $6);

-- name: job_finished_by
-- Tracing: the job $1 with its counts, if worker $2's claim of one of the chunks $3 ended in
-- the transaction that finished it (this daemon announces it on the job's trace); else no row.
SELECT kind, overall_status, total_chunks, completed_chunks, failed_chunks, cancelled_chunks,
       traceparent
FROM chunkd.job_finished_by($1, $2, $3);

-- name: complete_attempts
SELECT id FROM chunkd.complete_attempts($1, $2, $3, $4) AS id;

-- name: complete_and_append
-- A continuation: the completion and the chunks it appends, fenced together (NULL: fenced out).
SELECT chunkd.complete_and_append($1, $2, $3, $4::jsonb, $5::jsonb);

-- name: fail_attempt
SELECT chunkd.fail_attempt($1, $2, $3, $4, $5, $6, $7, $8);

-- name: release_attempts
-- Prefetched claims not started in time go back to the queue (no attempt spent).
SELECT chunkd.release_attempts($1, $2);

-- name: snooze_attempt
-- A handler's RetryLater: 'snoozed' (no attempt spent), or past the snooze limit 'pending' or
-- 'failed' as a failure; NULL when fenced out. $7, $8: the claim's lease_expires_at and lease.
SELECT chunkd.snooze_attempt($1, $2, $3, $4, $5, $6, $7, $8);

-- name: renew_attempts
-- The claims (chunk, attempt) whose lease was renewed: a held claim missing here is not ours.
SELECT id, attempt FROM chunkd.renew_attempts($1, $2, $3, $4);

-- name: stop_worker
-- A graceful stop's last statement: hand back every chunk this worker still holds (also one
-- whose claim's reply never arrived) and remove its row. Returns how many were released.
SELECT chunkd.release_attempts($1, NULL) AS released, chunkd.deregister_worker($1);

-- name: ops_reap
-- `chunkd reap`: the reaper's work once, by hand; returns how many chunks it returned.
SELECT chunkd.cleanup_stuck_chunks();

-- name: reap_expired
-- The reaper: attempts whose lease ran out, or that a dead worker made, end as reaped, their
-- chunks go back to the queue (or fail for good on their last attempt). One row per chunk
-- returned, to log each; rule: 'lease' (its lease ran out) or 'worker' (its worker missed
-- three heartbeats).
SELECT r.sync_job_id, r.chunk_id, r.queue_id, r.seq, r.attempt, r.kind, r.worker_id, r.final,
       r.rule
FROM chunkd.reap_attempts() r;

-- name: retention_round
-- The maintenance: finished jobs (up to $1 chunks) to the history, expired partitions dropped;
-- ran false when another daemon's round holds the lock.
SELECT r.ran, r.moved_jobs, r.moved_chunks, r.expired_jobs, r.created_partitions,
       r.dropped_partitions, r.more
FROM chunkd.retention_round($1) r;

-- name: register_worker
SELECT chunkd.register_worker($1, $2, $3, $4, $5, $6);

-- name: worker_alive
-- This daemon's heartbeat in the registry ($2: seconds between heartbeats; $3 to $7 its
-- registration, for a row pruned meanwhile); the database clock.
SELECT chunkd.worker_alive($1, $2, $3, $4, $5, $6, $7);

-- name: prune_workers
-- Registry rows of daemons not heard from for $1 seconds, holding nothing: removed.
SELECT chunkd.prune_workers($1);

-- name: next_due_in
-- Seconds until the earliest pending chunk is due (armed as a timer at start-up and after a
-- reconnect; NULL when nothing is pending).
SELECT chunkd.next_due_in($1);

-- name: queue_depth
-- status in (pending, paused, throttled, scheduled, processing) and how many chunks; sampled by
-- the metrics task.
SELECT status, chunks FROM chunkd.queue_depth();

-- Schedules (chunkd.runtime.schedules fires them; chunkd.db.schedules runs these)

-- name: schedule_clock
SELECT pg_catalog.clock_timestamp();

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
    pg_catalog.jsonb_build_array(
        $1::jsonb || CASE WHEN $2::float8 IS NULL THEN '{}'::jsonb
                          ELSE pg_catalog.jsonb_build_object(
                              'run_at', pg_catalog.now() + pg_catalog.make_interval(secs => $2))
                     END),
    true) j;

-- name: ops_append_chunks
SELECT chunkd.append_chunks($1, $2::jsonb);

-- name: ops_close_sync_job
SELECT chunkd.close_sync_job($1);

-- name: ops_job_state
-- `chunkd wait`: the job's overall status and whether it is finished (NULL: no such job).
SELECT s.overall_status, s.finished_at IS NOT NULL AS finished
FROM chunkd.chunk_processing_status s
WHERE s.parent_sync_job_id = $1;

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
FROM chunkd.schedules s LEFT JOIN chunkd.all_jobs j ON j.id = s.last_job_id
ORDER BY s.name;

-- name: ops_recent_job_ids
-- The newest jobs first ($1 = how many; NULL = all), live or in the history.
SELECT j.id
FROM chunkd.sync_jobs j
ORDER BY j.created_at DESC, j.id
LIMIT $1;

-- name: ops_job_total
-- How many jobs there are in all: the live ones counted, the history's from its counts (never
-- a scan of the history).
SELECT COALESCE(pg_catalog.sum(c.jobs), 0)::bigint
FROM chunkd.sync_job_status_counts(NULL) c;

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
-- With the flow controls that apply to the job: its own, its key's and its kind's (a job's
-- burst is the one its bucket got at enqueue), live or in the history.
SELECT j.priority, j.max_concurrency, j.max_attempts, j.dedupe_key, j.paused_at, j.max_per_second,
       f.burst AS job_burst, j.concurrency_key, f.key_max_concurrency,
       f.kind_paused_at, f.kind_per_second, f.kind_burst
FROM chunkd.all_jobs j
CROSS JOIN LATERAL chunkd.job_flow(j.public_id) f
WHERE j.public_id = $1;

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
    UNION ALL
    -- The history: the same from the attempts and the version 1 audit rows a job moved there.
    SELECT a.ended_at, a.seq, a.outcome, a.attempt, a.worker_id, a.error
    FROM chunkd.history_attempts a
    WHERE a.sync_job_id = $1 AND a.error IS NOT NULL
    UNION ALL
    SELECT e.at, e.seq, e.event, e.attempt, e.worker_id, e.error
    FROM chunkd.history_events e
    WHERE e.sync_job_id = $1 AND e.v1 AND e.error IS NOT NULL
) e
ORDER BY e.at DESC
LIMIT $2;

-- name: ops_live_worker_for_kind
-- Is any live worker able to run kind $1? Live: heard from within $2 seconds, or for $2 NULL
-- within three of its own heartbeats (the reaper's rule, chunkd.reap_attempts), $3 seconds
-- for a daemon that does not say how often it heartbeats.
SELECT EXISTS (
    SELECT 1 FROM chunkd.workers w
    WHERE $1 = ANY (w.kinds)
      AND w.last_heartbeat_at >= pg_catalog.now() - pg_catalog.make_interval(
              secs => coalesce($2::float8, 3 * w.heartbeat_s, $3::float8)));

-- name: ops_retry_failed_chunks
SELECT chunkd.retry_failed_chunks($1);

-- name: ops_cancel_sync_job
SELECT chunkd.cancel_sync_job($1);

-- name: ops_purge_finished_jobs
SELECT chunkd.purge_finished_jobs($1);

-- name: ops_retention_policies
SELECT r.state, r.keep_s, r.changed_at FROM chunkd.retention_policies() r;

-- name: ops_set_retention
SELECT chunkd.set_retention($1, $2);

-- name: ops_workers
-- Heartbeat ages by the database clock, so the client's clock does not matter. stale_after_s:
-- how long a silence makes it stale: $1 seconds, or for $1 NULL three of its own heartbeats
-- (the reaper's rule, chunkd.reap_attempts), $2 for a daemon that does not say how often it
-- heartbeats (heartbeat_s NULL: chunkd 0.2).
SELECT w.worker_id, w.host, w.pid, w.version, w.kinds, w.concurrency, w.started_at,
       w.last_heartbeat_at,
       extract(epoch FROM pg_catalog.now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s,
       w.heartbeat_s,
       coalesce($1::float8, 3 * w.heartbeat_s, $2::float8) AS stale_after_s
FROM chunkd.workers w
ORDER BY w.host, w.started_at, w.worker_id;

-- Flow control (chunkd pause/resume/limit; chunkd.ops.flow runs them)

-- name: ops_pause_sync_job
SELECT chunkd.pause_sync_job($1);

-- name: ops_resume_sync_job
SELECT chunkd.resume_sync_job($1);

-- name: ops_pause_kind
SELECT chunkd.pause_kind($1);

-- name: ops_resume_kind
SELECT chunkd.resume_kind($1);

-- name: ops_set_rate_limit
SELECT chunkd.set_rate_limit($1, $2, $3);

-- name: ops_set_concurrency_limit
SELECT chunkd.set_concurrency_limit($1, $2);

-- name: ops_flow_limits
SELECT scope, name, paused_at, per_second, burst, tokens, max_concurrency, processing, pending,
       active_jobs
FROM chunkd.flow_limits();

-- Python client (chunkd.client, chunkd.client.sync): the same statements for asyncpg and
-- psycopg (through its raw cursors, which take $n placeholders). Casts on every parameter, so
-- each driver sends what the function takes; jsonb comes back as text, decoded by the client.

-- name: client_create_sync_job
SELECT chunkd.create_sync_job($1::text, $2::jsonb, $3::jsonb, $4::int, $5::int, $6::int,
                              $7::timestamptz, $8::text, open => $9::boolean,
                              on_finish_kind => $10::text, max_per_second => $11::numeric,
                              concurrency_key => $12::text, traceparent => $13::text);

-- name: client_create_labeled_job
-- client_create_sync_job with a label ($14): through create_jobs, as create_sync_job itself
-- goes, since create_sync_job has no label argument (sql/functions/enqueue.sql says why).
SELECT j.sync_job_id
FROM chunkd.create_jobs(
    pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
        'kind', $1::text, 'chunks', $2::jsonb, 'payload', $3::jsonb, 'max_concurrency', $4::int,
        'max_attempts', $5::int, 'priority', $6::int, 'run_at', $7::timestamptz,
        'dedupe_key', $8::text, 'open', $9::boolean, 'on_finish_kind', $10::text,
        'max_per_second', $11::numeric, 'concurrency_key', $12::text,
        'traceparent', $13::text, 'label', $14::text)),
    true) j;

-- name: client_create_sync_jobs
-- Ids in input order.
SELECT create_sync_jobs FROM chunkd.create_sync_jobs($1::jsonb) WITH ORDINALITY
ORDER BY ordinality;

-- name: client_get_progress
SELECT chunkd.get_sync_job_progress($1::uuid)::text;

-- name: client_cancel
SELECT chunkd.cancel_sync_job($1::uuid);

-- name: client_retry_failed
SELECT chunkd.retry_failed_chunks($1::uuid);

-- `chunkd doctor` (chunkd.ops.doctor): read-only, and each needs no privilege beyond
-- connecting; what a role may not see is counted and reported, never an error.

-- name: doctor_role
-- Who this is and what it may see: superuser; member of the owner of schema chunkd (NULL: no
-- schema); pg_read_all_stats (without it other roles' sessions show no state, start time or
-- locks waited for); how many sessions of this database it cannot see into; the server.
SELECT current_user AS role,
       pg_catalog.current_database() AS database,
       pg_catalog.current_setting('server_version') AS server_version,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       r.rolsuper AS superuser,
       pg_catalog.pg_has_role(n.nspowner, 'USAGE') AS owner,
       pg_catalog.pg_has_role('pg_read_all_stats'::pg_catalog.name, 'USAGE') AS read_all_stats,
       (SELECT pg_catalog.count(*)::int
        FROM pg_catalog.pg_stat_activity a
        WHERE a.datname = pg_catalog.current_database()
          AND a.pid <> pg_catalog.pg_backend_pid()
          AND NOT coalesce(pg_catalog.pg_has_role(a.usesysid, 'USAGE'), false)
          AND NOT pg_catalog.pg_has_role('pg_read_all_stats'::pg_catalog.name, 'USAGE')
       ) AS hidden_sessions
FROM pg_catalog.pg_roles r
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = 'chunkd'
WHERE r.rolname = current_user;

-- name: doctor_xmin_holders
-- What holds back the xmin horizon of this database (VACUUM keeps every row deleted after it),
-- oldest first, at most $1: sessions (their snapshot or their transaction id), replication
-- slots, prepared transactions. xid_age in transactions; age_s (seconds) where a start is
-- known: a session's transaction (if this role may see it), a prepared transaction. visible:
-- whether this role may see the session's state and start.
SELECT h.holder, h.pid, h.name, h.role, h.application, h.state, h.active, h.visible,
       h.xid_age, h.age_s
FROM (
    SELECT 'session' AS holder, a.pid, NULL::text AS name, a.usename::text AS role,
           a.application_name AS application, a.state, NULL::boolean AS active,
           (coalesce(pg_catalog.pg_has_role(a.usesysid, 'USAGE'), false)
            OR pg_catalog.pg_has_role('pg_read_all_stats'::pg_catalog.name, 'USAGE')) AS visible,
           GREATEST(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid)) AS xid_age,
           extract(epoch FROM pg_catalog.now() - a.xact_start)::float8 AS age_s
    FROM pg_catalog.pg_stat_activity a
    WHERE a.pid <> pg_catalog.pg_backend_pid()
      AND (a.datname = pg_catalog.current_database() OR a.datname IS NULL)
      AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
    UNION ALL
    SELECT 'replication slot', s.active_pid, s.slot_name::text, NULL, s.plugin::text,
           s.slot_type, s.active, true, pg_catalog.age(s.xmin), NULL
    FROM pg_catalog.pg_replication_slots s
    WHERE s.xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared transaction', NULL, p.gid, p.owner::text, NULL, NULL, NULL, true,
           pg_catalog.age(p.transaction),
           extract(epoch FROM pg_catalog.now() - p.prepared)::float8
    FROM pg_catalog.pg_prepared_xacts p
    WHERE p.database = pg_catalog.current_database()
) h
ORDER BY h.xid_age DESC, h.age_s DESC NULLS LAST
LIMIT $1;

-- name: doctor_idle_in_transaction
-- Sessions of this database idle inside a transaction for more than $1 seconds, longest
-- first: the locks they hold on chunkd tables and views (not their indexes), and the sessions
-- waiting for a lock they hold.
SELECT a.pid, a.usename::text AS role, a.application_name AS application,
       a.client_addr::text AS client, a.state,
       extract(epoch FROM pg_catalog.now() - a.state_change)::float8 AS idle_s,
       ARRAY(SELECT pg_catalog.format('%s (%s)', c.oid::pg_catalog.regclass, l.mode)
             FROM pg_catalog.pg_locks l
             JOIN pg_catalog.pg_class c ON c.oid = l.relation
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE l.pid = a.pid AND l.granted AND n.nspname = 'chunkd'
               AND c.relkind IN ('r', 'p', 'v', 'm')
             ORDER BY 1) AS chunkd_locks,
       ARRAY(SELECT w.pid
             FROM pg_catalog.pg_stat_activity w
             WHERE w.wait_event_type = 'Lock'
               AND a.pid = ANY (pg_catalog.pg_blocking_pids(w.pid))
             ORDER BY w.pid) AS blocking
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = pg_catalog.current_database()
  AND a.pid <> pg_catalog.pg_backend_pid()
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND a.state_change < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
ORDER BY a.state_change;

-- name: doctor_tables
-- Each chunkd table: live and dead rows (the statistics collector's estimates), when it was
-- last vacuumed, and the dead rows at which autovacuum starts on it (its own settings, or the
-- server's); most dead rows first.
SELECT s.relname::text AS name, s.n_live_tup AS live, s.n_dead_tup AS dead,
       extract(epoch FROM pg_catalog.now() - s.last_autovacuum)::float8 AS autovacuum_s_ago,
       extract(epoch FROM pg_catalog.now() - s.last_vacuum)::float8 AS vacuum_s_ago,
       pg_catalog.current_setting('autovacuum')::bool
           AND coalesce(o.enabled, true) AS autovacuum,
       coalesce(o.threshold,
                pg_catalog.current_setting('autovacuum_vacuum_threshold')::float8)
       + coalesce(o.scale_factor,
                  pg_catalog.current_setting('autovacuum_vacuum_scale_factor')::float8)
         * GREATEST(c.reltuples, 0)::float8 AS autovacuum_at
FROM pg_catalog.pg_stat_user_tables s
JOIN pg_catalog.pg_class c ON c.oid = s.relid
LEFT JOIN LATERAL (
    SELECT pg_catalog.bool_and(t.option_value::bool)
               FILTER (WHERE t.option_name = 'autovacuum_enabled') AS enabled,
           pg_catalog.max(t.option_value::float8)
               FILTER (WHERE t.option_name = 'autovacuum_vacuum_threshold') AS threshold,
           pg_catalog.max(t.option_value::float8)
               FILTER (WHERE t.option_name = 'autovacuum_vacuum_scale_factor') AS scale_factor
    FROM pg_catalog.pg_options_to_table(c.reloptions) t
) o ON true
WHERE s.schemaname = 'chunkd'
ORDER BY s.n_dead_tup DESC, s.relname;

-- name: doctor_privileges
-- Whether this role may execute each chunkd function named in $1 (every overload) and read
-- each chunkd table or view named in $2; needs no privilege itself.
SELECT 'function' AS kind, p.proname::text AS name,
       p.oid::pg_catalog.regprocedure::text AS signature,
       pg_catalog.has_function_privilege(p.oid, 'EXECUTE') AS granted
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'chunkd' AND p.proname = ANY ($1::text[])
UNION ALL
SELECT 'relation', c.relname::text, c.oid::pg_catalog.regclass::text,
       pg_catalog.has_table_privilege(c.oid, 'SELECT')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'chunkd' AND c.relname = ANY ($2::text[])
ORDER BY 1, 2, 3;

-- name: doctor_notify
-- The LISTEN/NOTIFY round trip: a channel of the doctor's own ($1), never the daemons'.
SELECT pg_catalog.pg_notify($1, $2);

-- name: doctor_clock
SELECT pg_catalog.clock_timestamp();

-- chunkd.testing (tests of applications, on a throwaway database; never the daemon)

-- name: testing_fast_forward
-- drain(): the chunks of kinds $1 that wait for a retry's backoff or their job's run_at become
-- due now. How many.
WITH delayed_jobs AS (
    UPDATE chunkd.jobs SET run_at = pg_catalog.now()
    WHERE run_at > pg_catalog.now() AND kind = ANY ($1::text[])
    RETURNING id
), due AS (
    UPDATE chunkd.scheduled SET run_at = pg_catalog.now()
    WHERE run_at > pg_catalog.now() AND kind = ANY ($1::text[])
    RETURNING chunk_id
)
SELECT pg_catalog.count(*)::int FROM due;

-- name: testing_release
-- The simulators hand back chunks they claimed while looking for one (without spending the
-- attempt): $1 the worker, $2 the chunks' queue ids.
SELECT chunkd.release_chunks($1::text, $2::uuid[]);

-- name: testing_enqueued
-- assert_enqueued(): the jobs of kind $1 (NULL: any) whose payload contains $2 (jsonb @>;
-- NULL: any) and one of whose chunks' payloads contains $3 (NULL: any), oldest first, with the
-- chunks' payloads in seq order.
SELECT j.id, j.kind, j.payload::text,
       (SELECT pg_catalog.jsonb_agg(c.payload ORDER BY c.seq)
        FROM chunkd.chunked_sync_jobs c WHERE c.sync_job_id = j.id)::text AS chunks
FROM chunkd.sync_jobs j
WHERE ($1::text IS NULL OR j.kind = $1::text)
  AND ($2::jsonb IS NULL OR j.payload @> $2::jsonb)
  AND ($3::jsonb IS NULL OR EXISTS (SELECT 1 FROM chunkd.chunked_sync_jobs c
                                    WHERE c.sync_job_id = j.id AND c.payload @> $3::jsonb))
ORDER BY j.created_at, j.id;

-- name: testing_results
-- results(): a job's chunks in seq order: status, result (JSON text) and error.
SELECT q.seq, q.status, q.result::text, q.error_message
FROM chunkd.chunk_processing_queue q
WHERE q.parent_sync_job_id = $1::uuid
ORDER BY q.seq;
