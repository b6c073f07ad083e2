-- chunkd schema version 1: the queue, its audit trail, and the public SQL contract.
--
-- The names below (tables, functions, the view) are a public API: edge functions and other
-- languages call them. Functions are SECURITY DEFINER with a pinned search_path so a role can
-- be granted EXECUTE on exactly the functions it needs and nothing on the tables.

-- Applied by chunkd.migrate inside one transaction, after the schema and the version table exist.

REVOKE ALL ON SCHEMA chunkd FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

CREATE TABLE chunkd.sync_jobs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind            text NOT NULL CHECK (length(kind) BETWEEN 1 AND 200),
    payload         jsonb NOT NULL DEFAULT '{}',
    max_concurrency int CHECK (max_concurrency IS NULL OR max_concurrency >= 1),
    max_attempts    int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    priority        int NOT NULL DEFAULT 0,
    total_chunks    int NOT NULL CHECK (total_chunks >= 1),
    cancelled_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    -- Stamped lazily (by cleanup_stuck_chunks) so completions never contend on the job row;
    -- readers use chunkd.job_finished_at(), which derives it at once.
    finished_at     timestamptz
);

-- Limited jobs that may still have work: the claim path locks these rows.
CREATE INDEX sync_jobs_limited_active ON chunkd.sync_jobs (priority DESC, created_at)
    WHERE max_concurrency IS NOT NULL AND finished_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX sync_jobs_unfinished ON chunkd.sync_jobs (created_at) WHERE finished_at IS NULL;
CREATE INDEX sync_jobs_finished ON chunkd.sync_jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE chunkd.chunked_sync_jobs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    sync_job_id uuid NOT NULL REFERENCES chunkd.sync_jobs (id) ON DELETE CASCADE,
    seq         int NOT NULL CHECK (seq >= 0),
    payload     jsonb NOT NULL,
    UNIQUE (sync_job_id, seq)
);

CREATE TABLE chunkd.chunk_processing_queue (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- No unique index or foreign key on chunk_id: every claim and completion rewrites every
    -- index of this table (status changes rule out HOT updates), so each index costs on the hot
    -- path. create_sync_job is the only writer of queue rows; they go with their job.
    chunk_id           uuid NOT NULL,
    parent_sync_job_id uuid NOT NULL REFERENCES chunkd.sync_jobs (id) ON DELETE CASCADE,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    attempts           int NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts       int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    completed_at       timestamptz,
    error_message      text,
    worker_id          text,
    run_at             timestamptz NOT NULL DEFAULT now(),
    lease_expires_at   timestamptz,
    result             jsonb,
    -- Copies of immutable job/chunk attributes, so claiming reads one table through one index.
    seq                int NOT NULL,
    kind               text NOT NULL,
    priority           int NOT NULL,
    limited            boolean NOT NULL
);

-- Claiming unlimited jobs: ordering by seq across jobs of equal priority interleaves them
-- (every job's chunk 0, then every job's chunk 1, ...), so a small job is never starved by a
-- huge one. Partial: finished chunks cost nothing here, however many there are.
CREATE INDEX chunk_queue_claim ON chunkd.chunk_processing_queue (priority DESC, seq)
    WHERE status = 'pending' AND NOT limited;
-- Per-job view of live chunks: the window of limited jobs and "is this job done?".
CREATE INDEX chunk_queue_live_by_job ON chunkd.chunk_processing_queue (parent_sync_job_id, seq)
    WHERE status IN ('pending', 'processing');
-- The reaper: expired leases.
CREATE INDEX chunk_queue_leases ON chunkd.chunk_processing_queue (lease_expires_at)
    WHERE status = 'processing';
-- Progress, cancel and purge of one job across all states.
CREATE INDEX chunk_queue_by_job ON chunkd.chunk_processing_queue (parent_sync_job_id);

-- The audit trail: one row per transition, written by the statement that makes it.
-- Append-only, written on the hot path: one index (per job: audit queries and purge), and the
-- identity column orders events without a primary-key index to maintain.
CREATE TABLE chunkd.chunk_events (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    queue_id    uuid NOT NULL,
    sync_job_id uuid NOT NULL,
    event       text NOT NULL CHECK (event IN ('enqueued', 'claimed', 'completed', 'failed',
                    'retry_scheduled', 'reaped', 'released', 'cancelled', 'retried')),
    status      text NOT NULL,
    attempt     int NOT NULL,
    worker_id   text,
    error       text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX chunk_events_by_job ON chunkd.chunk_events (sync_job_id);

CREATE TABLE chunkd.workers (
    worker_id         text PRIMARY KEY,
    host              text NOT NULL,
    pid               int NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    version           text NOT NULL,
    kinds             text[] NOT NULL,
    concurrency       int NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

-- Error messages are stored for operators, not as a dump: keep rows small. (Text cannot hold
-- NUL bytes at all; the daemon strips them before it sends an error.)
CREATE FUNCTION chunkd.clip_error(error text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN left(error, 4000);

-- Exponential backoff with jitter: the delay for a retry after `attempt` attempts lies in
-- [d/2, d] with d = least(cap, base * 2^(attempt-1)), so retries of many chunks spread out.
CREATE FUNCTION chunkd.retry_delay(attempt int, base interval, cap interval) RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN least(cap, base * power(2, least(greatest(attempt - 1, 0), 60))) * (0.5 + random() * 0.5);

-- A job is finished when none of its chunks is pending or processing; its finish time is that
-- of its last terminal chunk. Derived here so that readers never wait for the lazy stamp.
CREATE FUNCTION chunkd.job_finished_at(job_id uuid) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
RETURN (
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM chunkd.chunk_processing_queue q
                     WHERE q.parent_sync_job_id = job_id AND q.status IN ('pending', 'processing'))
        THEN NULL
        ELSE coalesce(
            (SELECT j.finished_at FROM chunkd.sync_jobs j WHERE j.id = job_id),
            (SELECT max(q.completed_at) FROM chunkd.chunk_processing_queue q
             WHERE q.parent_sync_job_id = job_id))
    END
);

-- ---------------------------------------------------------------------------------------------
-- Enqueue
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION chunkd.create_sync_job(
    kind text,
    chunks jsonb,
    payload jsonb DEFAULT '{}',
    max_concurrency int DEFAULT NULL,
    max_attempts int DEFAULT 3,
    priority int DEFAULT 0
) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job_id uuid := gen_random_uuid();
    n int;
BEGIN
    IF kind IS NULL OR length(kind) = 0 OR length(kind) > 200 THEN
        RAISE EXCEPTION 'chunkd: kind must be a non-empty text of at most 200 characters'
            USING ERRCODE = '22023';
    END IF;
    IF chunks IS NULL OR jsonb_typeof(chunks) <> 'array' THEN
        RAISE EXCEPTION 'chunkd: chunks must be a JSON array of chunk payloads, got %',
            coalesce(jsonb_typeof(chunks), 'null') USING ERRCODE = '22023';
    END IF;
    n := jsonb_array_length(chunks);
    IF n = 0 THEN
        RAISE EXCEPTION 'chunkd: chunks must not be empty' USING ERRCODE = '22023';
    END IF;
    IF max_concurrency IS NOT NULL AND max_concurrency < 1 THEN
        RAISE EXCEPTION 'chunkd: max_concurrency must be NULL (unlimited) or >= 1, got %',
            max_concurrency USING ERRCODE = '22023';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'chunkd: max_attempts must be >= 1, got %', max_attempts
            USING ERRCODE = '22023';
    END IF;
    -- Documented limits: a queue is not a blob store, and one huge job must not bloat the
    -- tables every claim reads. (Sizes as stored, i.e. after jsonb encoding.)
    IF pg_column_size(chunks) > 16 * 1024 * 1024 THEN
        RAISE EXCEPTION 'chunkd: chunks are % bytes, above the limit of 16 MiB per job',
            pg_column_size(chunks) USING ERRCODE = '54000';
    END IF;
    IF pg_column_size(payload) > 1024 * 1024 THEN
        RAISE EXCEPTION 'chunkd: job payload is % bytes, above the limit of 1 MiB',
            pg_column_size(payload) USING ERRCODE = '54000';
    END IF;
    IF n > 1000000 THEN
        RAISE EXCEPTION 'chunkd: % chunks in one job, above the limit of 1,000,000', n
            USING ERRCODE = '54000';
    END IF;

    INSERT INTO chunkd.sync_jobs (id, kind, payload, max_concurrency, max_attempts, priority,
                                  total_chunks)
    VALUES (job_id, kind, coalesce(payload, '{}'), max_concurrency, max_attempts,
            coalesce(priority, 0), n);

    -- One statement for chunks, queue rows and audit rows: one NOTIFY for the whole job.
    WITH c AS (
        INSERT INTO chunkd.chunked_sync_jobs (sync_job_id, seq, payload)
        SELECT job_id, (e.ordinality - 1)::int, e.value
        FROM jsonb_array_elements(chunks) WITH ORDINALITY AS e(value, ordinality)
        RETURNING id, seq
    ), q AS (
        INSERT INTO chunkd.chunk_processing_queue
            (chunk_id, parent_sync_job_id, max_attempts, seq, kind, priority, limited)
        SELECT c.id, job_id, max_attempts, c.seq, kind, coalesce(priority, 0),
               max_concurrency IS NOT NULL
        FROM c
        RETURNING id
    )
    INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt)
    SELECT q.id, job_id, 'enqueued', 'pending', 0 FROM q;

    RETURN job_id;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Claim
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION chunkd.claim_next_chunk_job_safe(
    worker_id text,
    batch_size int DEFAULT 1,
    kinds text[] DEFAULT NULL,
    lease interval DEFAULT '10 minutes'
) RETURNS TABLE (
    queue_id uuid,
    chunk_id uuid,
    parent_sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    locked_jobs uuid[];
    p_worker_id text := claim_next_chunk_job_safe.worker_id;
    p_batch int := claim_next_chunk_job_safe.batch_size;
    p_kinds text[] := claim_next_chunk_job_safe.kinds;
    p_lease interval := claim_next_chunk_job_safe.lease;
BEGIN
    IF p_worker_id IS NULL OR length(p_worker_id) = 0 THEN
        RAISE EXCEPTION 'chunkd: worker_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'chunkd: batch_size must be >= 1, got %', p_batch USING ERRCODE = '22023';
    END IF;
    IF p_lease IS NULL OR p_lease <= interval '0' THEN
        RAISE EXCEPTION 'chunkd: lease must be a positive interval' USING ERRCODE = '22023';
    END IF;

    -- Jobs with max_concurrency: every claimer of such a job holds its row lock, and counts the
    -- job's processing chunks only after taking it (the next statement takes a fresh snapshot),
    -- so concurrent claimers can never exceed the limit. SKIP LOCKED: never wait on another
    -- claimer; its NOTIFY or our poll brings us back.
    SELECT array_agg(j.id) INTO locked_jobs
    FROM (
        SELECT j.id
        FROM chunkd.sync_jobs j
        WHERE j.max_concurrency IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
          AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
          AND EXISTS (SELECT 1 FROM chunkd.chunk_processing_queue q
                      WHERE q.parent_sync_job_id = j.id AND q.status = 'pending'
                        AND q.run_at <= now())
        ORDER BY j.priority DESC, j.created_at
        LIMIT p_batch
        FOR NO KEY UPDATE SKIP LOCKED
    ) j;

    RETURN QUERY
    WITH limited AS (
        -- A limited job offers the first (max_concurrency - processing) live chunks in seq
        -- order, and only those already due: a chunk waiting for its retry keeps its place, so
        -- max_concurrency = 1 runs strictly in seq order.
        SELECT w.id, w.priority, w.seq
        FROM chunkd.sync_jobs j
        CROSS JOIN LATERAL (
            SELECT q.id, q.priority, q.seq, q.run_at
            FROM chunkd.chunk_processing_queue q
            WHERE q.parent_sync_job_id = j.id AND q.status = 'pending'
            ORDER BY q.seq
            LIMIT greatest(0, j.max_concurrency - (
                SELECT count(*) FROM chunkd.chunk_processing_queue p
                WHERE p.parent_sync_job_id = j.id AND p.status = 'processing'))
        ) w
        WHERE j.id = ANY (locked_jobs) AND w.run_at <= now()
    ), unlimited AS (
        SELECT q.id, q.priority, q.seq
        FROM chunkd.chunk_processing_queue q
        WHERE q.status = 'pending' AND NOT q.limited AND q.run_at <= now()
          AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
        ORDER BY q.priority DESC, q.seq
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT c.id
        FROM (SELECT * FROM limited UNION ALL SELECT * FROM unlimited) c
        ORDER BY c.priority DESC, c.seq
        LIMIT p_batch
    ), claimed AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = 'processing',
            attempts = q.attempts + 1,
            started_at = now(),
            worker_id = p_worker_id,
            lease_expires_at = now() + p_lease
        FROM picked
        WHERE q.id = picked.id AND q.status = 'pending'
        RETURNING q.id, q.chunk_id, q.parent_sync_job_id, q.seq, q.attempts, q.kind,
                  q.lease_expires_at, q.priority
    ), audit AS (
        INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt, worker_id)
        SELECT c.id, c.parent_sync_job_id, 'claimed', 'processing', c.attempts, p_worker_id
        FROM claimed c
    ), started AS (
        UPDATE chunkd.sync_jobs j SET started_at = now()
        WHERE j.id IN (SELECT c.parent_sync_job_id FROM claimed c) AND j.started_at IS NULL
    )
    SELECT c.id, c.chunk_id, c.parent_sync_job_id, c.seq, c.attempts, c.kind,
           ch.payload, j.payload, c.lease_expires_at
    FROM claimed c
    JOIN chunkd.chunked_sync_jobs ch ON ch.id = c.chunk_id
    JOIN chunkd.sync_jobs j ON j.id = c.parent_sync_job_id
    ORDER BY c.priority DESC, c.seq;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Outcomes (all fenced: only the holder of the current claim may report)
-- ---------------------------------------------------------------------------------------------

-- Batch form used by the daemon; returns the queue ids whose completion was accepted.
CREATE FUNCTION chunkd.complete_chunks(
    worker_id text,
    queue_ids uuid[],
    attempts int[],
    results jsonb[] DEFAULT NULL
) RETURNS SETOF uuid
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- Statistics are always stale for a queue (at the last ANALYZE few rows were processing), and
-- the planner then joins the batch to every processing row in a nested loop: O(batch x
-- in flight). Fetch the batch by primary key ("id = ANY") and hash-join it instead.
SET enable_nestloop = off
BEGIN ATOMIC
    WITH input AS (
        SELECT i.queue_id, i.attempt, i.result
        FROM unnest(queue_ids, attempts, coalesce(results, array_fill(NULL::jsonb,
                    ARRAY[cardinality(queue_ids)]))) AS i(queue_id, attempt, result)
    ), done AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = 'completed', completed_at = now(), result = input.result,
            lease_expires_at = NULL, error_message = NULL
        FROM input
        WHERE q.id = ANY (complete_chunks.queue_ids) AND q.id = input.queue_id
          AND q.status = 'processing'
          AND q.worker_id = complete_chunks.worker_id AND q.attempts = input.attempt
        RETURNING q.id, q.parent_sync_job_id, q.attempts
    ), audit AS (
        INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt, worker_id)
        SELECT d.id, d.parent_sync_job_id, 'completed', 'completed', d.attempts,
               complete_chunks.worker_id
        FROM done d
    )
    SELECT d.id FROM done d;
END;

CREATE FUNCTION chunkd.complete_chunk_job_safe(
    queue_id uuid,
    worker_id text,
    attempt int,
    result jsonb DEFAULT NULL
) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT EXISTS (
        SELECT 1 FROM chunkd.complete_chunks(
            complete_chunk_job_safe.worker_id,
            ARRAY[complete_chunk_job_safe.queue_id],
            ARRAY[complete_chunk_job_safe.attempt],
            ARRAY[complete_chunk_job_safe.result]));
END;

-- Returns the new status ('pending' = retry scheduled, 'failed'), or NULL when fenced out.
-- retry_in overrides the backoff (a handler's RetryLater); base and cap tune the backoff.
CREATE FUNCTION chunkd.fail_chunk_job_safe(
    queue_id uuid,
    worker_id text,
    attempt int,
    error text,
    retryable boolean DEFAULT true,
    retry_in interval DEFAULT NULL,
    backoff_base interval DEFAULT '2 seconds',
    backoff_cap interval DEFAULT '10 minutes'
) RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH failed AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = CASE WHEN coalesce(fail_chunk_job_safe.retryable, true)
                               AND q.attempts < q.max_attempts
                          THEN 'pending' ELSE 'failed' END,
            run_at = CASE WHEN coalesce(fail_chunk_job_safe.retryable, true)
                               AND q.attempts < q.max_attempts
                          THEN now() + coalesce(fail_chunk_job_safe.retry_in,
                                   chunkd.retry_delay(q.attempts, fail_chunk_job_safe.backoff_base,
                                                      fail_chunk_job_safe.backoff_cap))
                          ELSE q.run_at END,
            completed_at = CASE WHEN coalesce(fail_chunk_job_safe.retryable, true)
                                     AND q.attempts < q.max_attempts
                                THEN NULL ELSE now() END,
            error_message = chunkd.clip_error(fail_chunk_job_safe.error),
            lease_expires_at = NULL
        WHERE q.id = fail_chunk_job_safe.queue_id AND q.status = 'processing'
          AND q.worker_id = fail_chunk_job_safe.worker_id
          AND q.attempts = fail_chunk_job_safe.attempt
        RETURNING q.id, q.parent_sync_job_id, q.status, q.attempts, q.error_message
    ), audit AS (
        INSERT INTO chunkd.chunk_events
            (queue_id, sync_job_id, event, status, attempt, worker_id, error)
        SELECT f.id, f.parent_sync_job_id,
               CASE f.status WHEN 'pending' THEN 'retry_scheduled' ELSE 'failed' END,
               f.status, f.attempts, fail_chunk_job_safe.worker_id, f.error_message
        FROM failed f
    )
    SELECT f.status FROM failed f;
END;

CREATE FUNCTION chunkd.heartbeat_chunks(
    worker_id text,
    queue_ids uuid[],
    lease interval
) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH renewed AS (
        UPDATE chunkd.chunk_processing_queue q
        SET lease_expires_at = now() + heartbeat_chunks.lease
        WHERE q.id = ANY (heartbeat_chunks.queue_ids) AND q.status = 'processing'
          AND q.worker_id = heartbeat_chunks.worker_id
        RETURNING 1
    )
    SELECT count(*)::int FROM renewed;
END;

-- Graceful shutdown: hand chunks back without spending the attempt they were claimed with.
CREATE FUNCTION chunkd.release_chunks(
    worker_id text,
    queue_ids uuid[]
) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH released AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = 'pending', attempts = q.attempts - 1, run_at = now(),
            worker_id = NULL, lease_expires_at = NULL, started_at = NULL
        WHERE q.id = ANY (release_chunks.queue_ids) AND q.status = 'processing'
          AND q.worker_id = release_chunks.worker_id
        RETURNING q.id, q.parent_sync_job_id, q.attempts
    ), audit AS (
        INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt, worker_id)
        SELECT r.id, r.parent_sync_job_id, 'released', 'pending', r.attempts,
               release_chunks.worker_id
        FROM released r
    )
    SELECT count(*)::int FROM released;
END;

-- ---------------------------------------------------------------------------------------------
-- Maintenance
-- ---------------------------------------------------------------------------------------------

-- Chunks whose lease expired (their worker died or hung) go back to pending, or to failed when
-- out of attempts. The lease is re-checked on the locked row, so a lease renewed meanwhile
-- survives; SKIP LOCKED makes concurrent reapers (cron plus many daemons) split the work.
-- Also stamps finished_at on jobs that have finished since the last pass.
CREATE FUNCTION chunkd.cleanup_stuck_chunks() RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
BEGIN
    WITH expired AS (
        SELECT q.id
        FROM chunkd.chunk_processing_queue q
        WHERE q.status = 'processing' AND q.lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
    ), reaped AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = CASE WHEN q.attempts < q.max_attempts THEN 'pending' ELSE 'failed' END,
            completed_at = CASE WHEN q.attempts < q.max_attempts THEN NULL ELSE now() END,
            run_at = now(),
            error_message = 'lease expired',
            lease_expires_at = NULL
        FROM expired
        WHERE q.id = expired.id AND q.status = 'processing' AND q.lease_expires_at < now()
        RETURNING q.id, q.parent_sync_job_id, q.status, q.attempts, q.worker_id
    ), audit AS (
        INSERT INTO chunkd.chunk_events
            (queue_id, sync_job_id, event, status, attempt, worker_id, error)
        SELECT r.id, r.parent_sync_job_id, 'reaped', r.status, r.attempts, r.worker_id,
               'lease expired'
        FROM reaped r
    )
    SELECT count(*) INTO n FROM reaped;

    UPDATE chunkd.sync_jobs j
    SET finished_at = chunkd.job_finished_at(j.id)
    WHERE j.finished_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM chunkd.chunk_processing_queue q
                      WHERE q.parent_sync_job_id = j.id
                        AND q.status IN ('pending', 'processing'));
    RETURN n;
END;
$$;

CREATE FUNCTION chunkd.cancel_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    n int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkd.sync_jobs j WHERE j.id = sync_job_id) THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    -- In-flight chunks are cancelled too: their handlers may still finish, but the outcome is
    -- fenced out, so the job reaches its terminal state now.
    WITH cancelled AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = 'cancelled', completed_at = now(), lease_expires_at = NULL
        WHERE q.parent_sync_job_id = sync_job_id AND q.status IN ('pending', 'processing')
        RETURNING q.id, q.attempts, q.worker_id
    ), audit AS (
        INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt, worker_id)
        SELECT c.id, sync_job_id, 'cancelled', 'cancelled', c.attempts, c.worker_id
        FROM cancelled c
    )
    SELECT count(*) INTO n FROM cancelled;
    IF n > 0 THEN
        UPDATE chunkd.sync_jobs j SET cancelled_at = now(), finished_at = now()
        WHERE j.id = sync_job_id;
    END IF;
    RETURN n;
END;
$$;

CREATE FUNCTION chunkd.retry_failed_chunks(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    n int;
    job_cancelled timestamptz;
BEGIN
    SELECT j.cancelled_at INTO job_cancelled FROM chunkd.sync_jobs j WHERE j.id = sync_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    IF job_cancelled IS NOT NULL THEN
        RAISE EXCEPTION 'chunkd: sync job % is cancelled; its chunks cannot be retried',
            sync_job_id USING ERRCODE = '55000';
    END IF;
    WITH retried AS (
        UPDATE chunkd.chunk_processing_queue q
        SET status = 'pending', attempts = 0, run_at = now(), completed_at = NULL,
            worker_id = NULL, lease_expires_at = NULL, started_at = NULL
        WHERE q.parent_sync_job_id = sync_job_id AND q.status = 'failed'
        RETURNING q.id
    ), audit AS (
        INSERT INTO chunkd.chunk_events (queue_id, sync_job_id, event, status, attempt)
        SELECT r.id, sync_job_id, 'retried', 'pending', 0 FROM retried r
    )
    SELECT count(*) INTO n FROM retried;
    IF n > 0 THEN
        UPDATE chunkd.sync_jobs j SET finished_at = NULL WHERE j.id = sync_job_id;
    END IF;
    RETURN n;
END;
$$;

-- Deletes jobs (with their chunks, queue rows and audit rows) finished before now() - older_than.
CREATE FUNCTION chunkd.purge_finished_jobs(older_than interval) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'chunkd: older_than must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    WITH doomed AS (
        SELECT j.id
        FROM chunkd.sync_jobs j
        WHERE coalesce(j.finished_at, chunkd.job_finished_at(j.id)) < now() - older_than
    ), events AS (
        DELETE FROM chunkd.chunk_events e USING doomed WHERE e.sync_job_id = doomed.id
    ), jobs AS (
        DELETE FROM chunkd.sync_jobs j USING doomed WHERE j.id = doomed.id RETURNING 1
    )
    SELECT count(*) INTO n FROM jobs;
    RETURN n;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Notifications
-- ---------------------------------------------------------------------------------------------

-- NOTIFY when work became runnable: chunks became pending (enqueue, retry, release, reap,
-- retry_failed) or a chunk of a limited job left 'processing' and freed a slot. The payload is
-- how many seconds until the work is due (0 = now), so a daemon can arm a timer for a future
-- retry instead of polling for it.
--
-- One notification per statement: inserts use a statement-level trigger over the transition
-- table. Updates use a row-level trigger whose WHEN clause is false on the hot path (claims,
-- completions of unlimited jobs), so those statements pay nothing; when a statement makes many
-- rows due now, their identical notifications are folded into one by PostgreSQL.
CREATE FUNCTION chunkd.trigger_next_chunk_processing() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_at timestamptz;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        SELECT min(n.run_at) INTO next_at FROM new_rows n WHERE n.status = 'pending';
    ELSE
        IF NEW.limited AND OLD.status = 'processing' THEN
            PERFORM pg_notify('chunkd', '0');  -- a slot of a limited job was freed
        END IF;
        IF NEW.status = 'pending' THEN
            next_at := NEW.run_at;
        END IF;
    END IF;
    IF next_at IS NOT NULL THEN
        -- Seconds until due by the database clock, so a client's clock skew does not matter.
        PERFORM pg_notify('chunkd',
                          greatest(0, round(extract(epoch FROM next_at - now()), 3))::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER chunk_queue_notify_insert
    AFTER INSERT ON chunkd.chunk_processing_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

CREATE TRIGGER chunk_queue_notify_update
    AFTER UPDATE ON chunkd.chunk_processing_queue
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND OLD.status <> 'pending'
          OR NEW.limited AND OLD.status = 'processing' AND NEW.status <> 'processing')
    EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

-- ---------------------------------------------------------------------------------------------
-- Monitoring
-- ---------------------------------------------------------------------------------------------

CREATE VIEW chunkd.chunk_processing_status AS
SELECT
    c.parent_sync_job_id,
    j.kind,
    c.total_chunks,
    c.pending_chunks,
    c.processing_chunks,
    c.completed_chunks,
    c.failed_chunks,
    c.cancelled_chunks,
    CASE
        WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN c.pending_chunks + c.processing_chunks > 0 THEN
            CASE WHEN c.pending_chunks = c.total_chunks AND c.ever_claimed = 0
                 THEN 'pending' ELSE 'processing' END
        WHEN c.failed_chunks > 0 THEN 'partial_failure'
        WHEN c.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END AS overall_status,
    round((c.total_chunks - c.pending_chunks - c.processing_chunks) * 100.0
          / nullif(c.total_chunks, 0), 2) AS progress_percentage,
    j.created_at,
    j.started_at,
    CASE WHEN c.pending_chunks + c.processing_chunks = 0
         THEN coalesce(j.finished_at, c.last_terminal_at) END AS finished_at
FROM (
    SELECT
        q.parent_sync_job_id,
        count(*)::int AS total_chunks,
        count(*) FILTER (WHERE q.status = 'pending')::int AS pending_chunks,
        count(*) FILTER (WHERE q.status = 'processing')::int AS processing_chunks,
        count(*) FILTER (WHERE q.status = 'completed')::int AS completed_chunks,
        count(*) FILTER (WHERE q.status = 'failed')::int AS failed_chunks,
        count(*) FILTER (WHERE q.status = 'cancelled')::int AS cancelled_chunks,
        count(*) FILTER (WHERE q.attempts > 0)::int AS ever_claimed,
        max(q.completed_at) AS last_terminal_at
    FROM chunkd.chunk_processing_queue q
    GROUP BY q.parent_sync_job_id
) c
JOIN chunkd.sync_jobs j ON j.id = c.parent_sync_job_id;

CREATE FUNCTION chunkd.get_sync_job_progress(sync_job_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT jsonb_build_object(
        'sync_job_id', s.parent_sync_job_id,
        'kind', s.kind,
        'total_chunks', s.total_chunks,
        'pending_chunks', s.pending_chunks,
        'processing_chunks', s.processing_chunks,
        'completed_chunks', s.completed_chunks,
        'failed_chunks', s.failed_chunks,
        'cancelled_chunks', s.cancelled_chunks,
        'overall_status', s.overall_status,
        'progress_percentage', s.progress_percentage,
        'created_at', s.created_at,
        'started_at', s.started_at,
        'finished_at', s.finished_at,
        'chunks_per_second', r.chunks_per_second,
        'eta_seconds', CASE
            WHEN s.pending_chunks + s.processing_chunks = 0 THEN 0
            WHEN r.chunks_per_second > 0
            THEN round((s.pending_chunks + s.processing_chunks) / r.chunks_per_second, 1)
        END)
    FROM chunkd.chunk_processing_status s
    CROSS JOIN LATERAL (
        SELECT CASE WHEN s.started_at IS NULL THEN NULL
                    ELSE round((s.completed_chunks + s.failed_chunks)::numeric
                               / greatest(extract(epoch FROM
                                   coalesce(s.finished_at, now()) - s.started_at), 0.001), 2)
               END AS chunks_per_second
    ) r
    WHERE s.parent_sync_job_id = get_sync_job_progress.sync_job_id;
END;

-- ---------------------------------------------------------------------------------------------
-- Workers (the daemon's registry; read by `chunkd workers`)
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION chunkd.register_worker(
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

CREATE FUNCTION chunkd.worker_heartbeat(worker_id text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE chunkd.workers w SET last_heartbeat_at = now()
    WHERE w.worker_id = worker_heartbeat.worker_id;
END;

CREATE FUNCTION chunkd.deregister_worker(worker_id text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    DELETE FROM chunkd.workers w WHERE w.worker_id = deregister_worker.worker_id;
END;

-- What the daemon reads besides its own claims is a function too (like schema_versions(),
-- created with the version table), so a worker role needs no table privileges at all.

-- Seconds until the earliest pending chunk of these kinds is due (database clock), or NULL.
CREATE FUNCTION chunkd.next_due_in(kinds text[] DEFAULT NULL) RETURNS float8
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT greatest(0, extract(epoch FROM min(q.run_at) - now()))::float8
    FROM chunkd.chunk_processing_queue q
    WHERE q.status = 'pending' AND (next_due_in.kinds IS NULL OR q.kind = ANY (next_due_in.kinds));
END;

-- Live queue depth for metrics: pending split into due and scheduled (waiting for a retry),
-- and processing. Reads only the partial indexes' rows, never the finished history.
CREATE FUNCTION chunkd.queue_depth()
RETURNS TABLE (status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT CASE WHEN q.status = 'pending' AND q.run_at > now() THEN 'scheduled' ELSE q.status END,
           count(*)
    FROM chunkd.chunk_processing_queue q
    WHERE q.status IN ('pending', 'processing')
    GROUP BY 1;
END;

-- Nothing is granted to PUBLIC: functions are executable by PUBLIC by default, so revoke.
REVOKE ALL ON ALL TABLES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkd FROM PUBLIC;
