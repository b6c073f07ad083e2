-- The reaper: chunks whose lease ran out go back to the queue (or fail, out of attempts).

-- Ends every open attempt whose lease has expired, or whose worker is dead (it said how often
-- it heartbeats, and missed three: a daemon killed or cut off does not hold its chunks for a
-- whole lease); its chunk goes back to `ready` (attempts left) or fails with "lease expired" or
-- "worker stopped heartbeating"; returns one row per attempt it ended, so the daemon logs every
-- reap (chunk.reaped) with the worker that held the lease. Safe from many daemons at once
-- (SKIP LOCKED), never touches a lease renewed meanwhile or a worker heard from meanwhile.
-- Fencing stays exact: a worker presumed dead that comes back finds its attempt ended.
-- SET enable_seqscan = off, jit = off: on tables not analyzed yet, the update of the expired
-- attempts was planned as a hash join over a scan of every attempt (docs/storage.md).
CREATE OR REPLACE FUNCTION chunkd.reap_expired()
RETURNS TABLE (sync_job_id uuid, chunk_id uuid, queue_id uuid, seq int, attempt int, kind text,
               worker_id text, final boolean)
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
    r_ids bigint[];
    r_claims int[];
    r_attempts int[];
    f_jobs bigint[];
    f_counts int[];
BEGIN
    WITH dead AS (
        SELECT w.worker_id FROM chunkd.workers w
        WHERE w.heartbeat_s IS NOT NULL
          AND w.last_heartbeat_at < now() - chunkd.seconds(3 * w.heartbeat_s)
    ), expired AS (
        SELECT a.chunk_id, a.n
        FROM chunkd.attempts a
        WHERE a.ended_at IS NULL
          AND (a.lease_expires_at < now() OR a.worker_id IN (SELECT d.worker_id FROM dead d))
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
               OR a.worker_id IN (SELECT w.worker_id FROM chunkd.workers w
                                  WHERE w.heartbeat_s IS NOT NULL
                                    AND w.last_heartbeat_at
                                        < now() - chunkd.seconds(3 * w.heartbeat_s)))
        RETURNING a.chunk_id, a.n, a.attempt, a.job_id, a.worker_id, a.final
    )
    SELECT array_agg(r.chunk_id), array_agg(r.n), array_agg(r.attempt), array_agg(r.job_id),
           array_agg(r.worker_id), array_agg(r.final)
    INTO a_ids, a_claims, a_attempts, a_jobs, a_workers, a_final
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
        SELECT j.public_id, c.chunk_id, c.queue_id, c.seq, u.att, j.kind, u.worker, u.fin
        FROM unnest(a_ids, a_attempts, a_workers, a_final) u(id, att, worker, fin)
        JOIN chunkd.chunks c ON c.id = u.id
        JOIN chunkd.jobs j ON j.id = c.job_id
        ORDER BY j.id, c.seq;
END;
$$;

-- The seed's name: how many chunks reap_expired() returned.
CREATE OR REPLACE FUNCTION chunkd.cleanup_stuck_chunks() RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*)::int FROM chunkd.reap_expired();
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
