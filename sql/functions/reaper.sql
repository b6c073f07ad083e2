-- The reaper: chunks whose lease ran out go back to the queue (or fail, out of attempts).

-- Ends every open attempt whose lease has expired, or that a dead worker made. A worker is dead
-- once it said how often it heartbeats and missed three heartbeats (a daemon killed or cut off
-- does not hold its chunks for a whole lease); a dead worker made each of its claims before its
-- next heartbeat was due (claimed_at <= last_heartbeat_at + heartbeat_s). A claim made after
-- that is a live daemon's whose heartbeat the database clock outran (a forward step of more
-- than two heartbeats): its lease protects it, so a step ends at most the attempts in flight
-- when it happened, never the claims made after it (each of which would burn an attempt, pass
-- after pass, until the daemon's next heartbeat). The chunk goes back to `ready` (attempts left)
-- or fails with "lease expired" or "worker stopped heartbeating"; returns one row per attempt
-- it ended, with the rule that ended it (`rule`: 'lease', its lease ran out; 'worker', its
-- worker missed three heartbeats), so the daemon logs every reap (chunk.reaped) with the worker
-- that held the lease. Safe from many daemons at once (SKIP LOCKED), never touches a lease
-- renewed meanwhile or a worker heard from meanwhile. Fencing stays exact: a worker presumed
-- dead that comes back finds its attempt ended.
-- SET enable_seqscan = off, jit = off: on tables not analyzed yet, the update of the expired
-- attempts was planned as a hash join over a scan of every attempt (docs/storage.md).
-- carry grants: chunkd.reap_expired() -> chunkd.reap_attempts()
CREATE OR REPLACE FUNCTION chunkd.reap_attempts()
RETURNS TABLE (sync_job_id uuid, chunk_id uuid, queue_id uuid, seq int, attempt int, kind text,
               worker_id text, final boolean, rule text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    a_ids bigint[];
    a_claims int[];
    a_attempts int[];
    a_jobs bigint[];
    a_workers text[];
    a_final boolean[];
    a_rules text[];
    r_ids bigint[];
    r_claims int[];
    r_attempts int[];
    f_jobs bigint[];
    f_counts int[];
BEGIN
    WITH dead AS (
        -- (worker, the last moment it could have claimed in): dead workers only
        SELECT w.worker_id, w.last_heartbeat_at + chunkd.seconds(w.heartbeat_s) AS claims_until
        FROM chunkd.workers w
        WHERE w.heartbeat_s IS NOT NULL
          AND w.last_heartbeat_at < now() - chunkd.seconds(3 * w.heartbeat_s)
    ), expired AS (
        SELECT a.chunk_id, a.n
        FROM chunkd.attempts a
        WHERE a.ended_at IS NULL
          AND (a.lease_expires_at < now()
               -- a hashed set first: the claim's time is looked up for dead workers only
               OR (a.worker_id IN (SELECT d.worker_id FROM dead d)
                   AND a.claimed_at <= (SELECT d.claims_until FROM dead d
                                        WHERE d.worker_id = a.worker_id)))
        FOR UPDATE SKIP LOCKED
    ), reaped AS (
        UPDATE chunkd.attempts a
        SET ended_at = now(), outcome = 'reaped',
            error = CASE WHEN a.lease_expires_at < now() THEN 'lease expired'
                         ELSE 'worker stopped heartbeating' END,
            final = a.attempt >= j.max_attempts
        FROM expired e, chunkd.jobs j
        WHERE a.chunk_id = e.chunk_id AND a.n = e.n AND j.id = a.job_id
          AND a.outcome IS NULL
          AND (a.lease_expires_at < now()
               OR EXISTS (SELECT 1 FROM chunkd.workers w
                          WHERE w.worker_id = a.worker_id AND w.heartbeat_s IS NOT NULL
                            AND w.last_heartbeat_at
                                < now() - chunkd.seconds(3 * w.heartbeat_s)
                            AND a.claimed_at
                                <= w.last_heartbeat_at + chunkd.seconds(w.heartbeat_s)))
        RETURNING a.chunk_id, a.n, a.attempt, a.job_id, a.worker_id, a.final,
                  CASE WHEN a.error = 'lease expired' THEN 'lease' ELSE 'worker' END AS rule
    )
    SELECT array_agg(r.chunk_id), array_agg(r.n), array_agg(r.attempt), array_agg(r.job_id),
           array_agg(r.worker_id), array_agg(r.final), array_agg(r.rule)
    INTO a_ids, a_claims, a_attempts, a_jobs, a_workers, a_final, a_rules
    FROM reaped r;
    IF a_ids IS NULL THEN
        RETURN;
    END IF;

    SELECT array_agg(u.id), array_agg(u.n), array_agg(u.att)
    INTO r_ids, r_claims, r_attempts
    FROM unnest(a_ids, a_claims, a_attempts, a_final) u(id, n, att, fin)
    WHERE NOT u.fin;
    IF r_ids IS NOT NULL THEN
        PERFORM chunkd.requeue(r_ids, r_claims, r_attempts,
                               array_fill(0::float8, ARRAY[cardinality(r_ids)]));
    END IF;
    SELECT array_agg(f.job ORDER BY f.job), array_agg(f.cnt ORDER BY f.job)
    INTO f_jobs, f_counts
    FROM (SELECT u.job, count(*)::int AS cnt
          FROM unnest(a_jobs, a_final) u(job, fin) WHERE u.fin GROUP BY 1) f;
    IF f_jobs IS NOT NULL THEN
        PERFORM chunkd.count_terminal(f_jobs, array_fill(0, ARRAY[cardinality(f_jobs)]), f_counts,
                                      array_fill(0, ARRAY[cardinality(f_jobs)]));
    END IF;
    RETURN QUERY
        SELECT j.public_id, c.chunk_id, c.queue_id, c.seq, u.att, j.kind, u.worker, u.fin, u.rule
        FROM unnest(a_ids, a_attempts, a_workers, a_final, a_rules) u(id, att, worker, fin, rule)
        JOIN chunkd.chunks c ON c.id = u.id
        JOIN chunkd.jobs j ON j.id = c.job_id
        ORDER BY j.id, c.seq;
END;
$$;

-- The reaper of chunkd 0.2 (its daemons and callers in other languages call it): the same work,
-- without the rule.
CREATE OR REPLACE FUNCTION chunkd.reap_expired()
RETURNS TABLE (sync_job_id uuid, chunk_id uuid, queue_id uuid, seq int, attempt int, kind text,
               worker_id text, final boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT r.sync_job_id, r.chunk_id, r.queue_id, r.seq, r.attempt, r.kind, r.worker_id,
               r.final
        FROM chunkd.reap_attempts() r;
END;
$$;

-- The seed's name: how many chunks reap_attempts() returned.
CREATE OR REPLACE FUNCTION chunkd.cleanup_stuck_chunks() RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*)::int FROM chunkd.reap_attempts();
$$;

-- Rows of the workers registry not heard from for `older_than_s` seconds (a daemon killed never
-- deregisters), once they hold nothing: the reaper's loop calls it. Returns how many it removed.
-- carry grants: chunkd.reap_expired() -> chunkd.prune_workers(double precision)
CREATE OR REPLACE FUNCTION chunkd.prune_workers(older_than_s float8) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH gone AS (
        DELETE FROM chunkd.workers w
        WHERE w.last_heartbeat_at < now() - chunkd.seconds(prune_workers.older_than_s)
          AND NOT EXISTS (SELECT 1 FROM chunkd.attempts a
                          WHERE a.ended_at IS NULL AND a.worker_id = w.worker_id)
        RETURNING 1
    )
    SELECT count(*)::int FROM gone;
END;
