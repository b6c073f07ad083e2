-- Leases and the workers registry: renewing what a worker still holds, handing chunks back on
-- a graceful stop, registering, heartbeating and deregistering a daemon.

-- worker_alive gained the daemon's registration (host, pid, version, kinds, concurrency) as
-- trailing arguments with defaults before its first release: every call of the two-argument
-- form resolves to the new one, which inherits its grants (below), so it is dropped here, in
-- the transaction that creates the new one.
DO $$
BEGIN
    IF to_regprocedure('chunkd.worker_alive(text,double precision)') IS NOT NULL THEN
        DROP FUNCTION chunkd.worker_alive(text, float8);
    END IF;
END;
$$;

-- The renewal of chunkd 0.2 (by chunk and worker, not attempt), kept for its daemons and for
-- callers in other languages; returns the ids renewed.
CREATE OR REPLACE FUNCTION chunkd.renew_leases(
    worker_id text,
    ids bigint[],
    lease_s float8
) RETURNS SETOF bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
BEGIN ATOMIC
    UPDATE chunkd.attempts a
    SET lease_expires_at = now() + chunkd.seconds(renew_leases.lease_s)
    WHERE a.chunk_id = ANY (renew_leases.ids) AND a.worker_id = renew_leases.worker_id
      AND a.outcome IS NULL
    RETURNING a.chunk_id;
END;

-- Extends the leases of the claims the caller still holds, each named by its chunk and attempt
-- (a lease belongs to one attempt: a chunk reaped and claimed again by the same worker has a
-- new one); returns those renewed. A claim missing from the answer is no longer the caller's:
-- its handler should stop.
-- carry grants: chunkd.renew_leases(text,bigint[],double precision) -> chunkd.renew_attempts(text,bigint[],integer[],double precision)
CREATE OR REPLACE FUNCTION chunkd.renew_attempts(
    worker_id text,
    ids bigint[],
    attempts int[],
    lease_s float8
) RETURNS TABLE (id bigint, attempt int)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
BEGIN ATOMIC
    UPDATE chunkd.attempts a
    SET lease_expires_at = now() + chunkd.seconds(renew_attempts.lease_s)
    FROM unnest(renew_attempts.ids, renew_attempts.attempts) AS h(id, attempt)
    WHERE a.chunk_id = h.id AND a.attempt = h.attempt
      AND a.worker_id = renew_attempts.worker_id AND a.outcome IS NULL
    RETURNING a.chunk_id, a.attempt;
END;

CREATE OR REPLACE FUNCTION chunkd.heartbeat_chunks(
    worker_id text,
    queue_ids uuid[],
    lease interval
) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT count(*)::int
    FROM chunkd.renew_leases(
        heartbeat_chunks.worker_id,
        ARRAY(SELECT c.id FROM chunkd.chunks c WHERE c.queue_id = ANY (heartbeat_chunks.queue_ids)),
        chunkd.seconds_of(heartbeat_chunks.lease));
END;

-- Graceful stop: hand chunks back without spending the attempt they were claimed with.
-- ids NULL = every chunk this worker holds (a stop that may have missed a claim's reply).
CREATE OR REPLACE FUNCTION chunkd.release_attempts(
    worker_id text,
    ids bigint[] DEFAULT NULL
) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r_ids bigint[];
    r_claims int[];
    r_attempts int[];
BEGIN
    WITH released AS (
        UPDATE chunkd.attempts a
        SET ended_at = now(), outcome = 'released', final = false
        WHERE a.worker_id = release_attempts.worker_id AND a.outcome IS NULL
          AND a.ended_at IS NULL
          AND (release_attempts.ids IS NULL OR a.chunk_id = ANY (release_attempts.ids))
        RETURNING a.chunk_id, a.n, a.attempt
    )
    SELECT array_agg(r.chunk_id), array_agg(r.n), array_agg(r.attempt - 1)
    INTO r_ids, r_claims, r_attempts
    FROM released r;
    IF r_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM chunkd.requeue(r_ids, r_claims, r_attempts,
                           array_fill(0::float8, ARRAY[cardinality(r_ids)]));
    RETURN cardinality(r_ids);
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.release_chunks(
    worker_id text,
    queue_ids uuid[]
) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT chunkd.release_attempts(
        release_chunks.worker_id,
        ARRAY(SELECT c.id FROM chunkd.chunks c WHERE c.queue_id = ANY (release_chunks.queue_ids)));
END;

CREATE OR REPLACE FUNCTION chunkd.register_worker(
    worker_id text, host text, pid int, version text, kinds text[], concurrency int
) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO chunkd.workers (worker_id, host, pid, version, kinds, concurrency)
    VALUES (register_worker.worker_id, register_worker.host, register_worker.pid,
            register_worker.version, register_worker.kinds, register_worker.concurrency)
    ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat_at = now();
END;

CREATE OR REPLACE FUNCTION chunkd.worker_heartbeat(worker_id text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE chunkd.workers w SET last_heartbeat_at = now()
    WHERE w.worker_id = worker_heartbeat.worker_id;
END;

-- A daemon's heartbeat in the workers registry, saying how often it comes (heartbeat_s,
-- seconds): a daemon silent for three heartbeats is dead, and the reaper returns its chunks
-- without waiting for each lease. Returns the database clock, so the daemon sees the clock step
-- (its own or the database's) between two heartbeats.
-- A daemon whose row is gone registers again with what it passes (as register_worker; its
-- started_at is then this heartbeat): prune_workers removes the row of a daemon silent for 15
-- minutes that holds nothing (a SIGSTOP, a frozen VM, a forward clock step), and one that comes
-- back would otherwise work on unseen by `chunkd workers`, the dashboard and the registry's
-- checks. Nothing else changes: it held no attempt when its row went, and its claims since
-- are fenced and leased as any. Without the registration (host NULL) it only heartbeats.
-- carry grants: chunkd.worker_heartbeat(text) -> chunkd.worker_alive(text,double precision,text,integer,text,text[],integer)
-- carry grants: chunkd.worker_alive(text,double precision) -> chunkd.worker_alive(text,double precision,text,integer,text,text[],integer)
CREATE OR REPLACE FUNCTION chunkd.worker_alive(
    worker_id text,
    heartbeat_s float8,
    host text DEFAULT NULL,
    pid int DEFAULT NULL,
    version text DEFAULT NULL,
    kinds text[] DEFAULT NULL,
    concurrency int DEFAULT NULL
) RETURNS timestamptz
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO chunkd.workers AS w (worker_id, host, pid, version, kinds, concurrency,
                                     heartbeat_s)
    SELECT worker_alive.worker_id, worker_alive.host, worker_alive.pid, worker_alive.version,
           worker_alive.kinds, worker_alive.concurrency, worker_alive.heartbeat_s
    WHERE worker_alive.host IS NOT NULL
    ON CONFLICT (worker_id) DO UPDATE
    SET last_heartbeat_at = now(), heartbeat_s = excluded.heartbeat_s;
    UPDATE chunkd.workers w
    SET last_heartbeat_at = now(), heartbeat_s = worker_alive.heartbeat_s
    WHERE w.worker_id = worker_alive.worker_id AND worker_alive.host IS NULL;
    SELECT clock_timestamp();
END;

CREATE OR REPLACE FUNCTION chunkd.deregister_worker(worker_id text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    DELETE FROM chunkd.workers w WHERE w.worker_id = deregister_worker.worker_id;
END;
