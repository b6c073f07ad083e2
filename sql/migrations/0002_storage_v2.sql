-- chunkd schema version 2: the hot queue split from history.
--
-- Version 1 kept one mutable row per chunk, rewritten with all its index entries by every claim
-- and every completion. Here the state of a chunk is *where its rows are* (design study:
-- shared/perf-study/REPORT.md, "split"):
--
--   jobs       one row per job, with counters of terminal chunks (so progress is O(1) and the
--              statement that ends a job's last chunk knows it, under the job's row lock);
--   chunks     immutable: a chunk's definition and its 'enqueued' record;
--   ready      chunks due now. Rows are inserted (enqueue, retry, reap, release, operator retry)
--              and deleted (claim, cancel), never updated, so a claim writes no index entry here;
--   scheduled  chunks due later (a retry's backoff), moved to `ready` when due;
--   attempts   one row per claim, at once the lease, the fencing token and the audit record of
--              that claim and its outcome;
--   events     cold-path transitions that are not attempts (cancel of a pending chunk, operator
--              retry).
--
-- Hot tables key on bigint; the uuids of version 1 stay the public identity (a job's id, a
-- chunk's queue_id and chunk_id) in `jobs` and `chunks`, which the claim joins anyway: measured
-- in the study at +2.3 us and +38 B per chunk when used as keys on the hot path instead.
--
-- The seed's objects keep their names as views (sync_jobs, chunked_sync_jobs,
-- chunk_processing_queue, chunk_events, chunk_processing_status), and every public function its
-- signature: CREATE OR REPLACE keeps the grants operators gave on them.
--
-- Upgrading a live database: everything runs in one transaction (chunkd.db.migrate) under an
-- exclusive lock on the version 1 tables, so daemons of version 0.1 wait, then find their calls
-- served by the new bodies: a chunk they hold keeps its lease and fencing (worker, attempt).

SET LOCAL lock_timeout = '60s';
LOCK TABLE chunkd.sync_jobs, chunkd.chunked_sync_jobs, chunkd.chunk_processing_queue,
    chunkd.chunk_events IN ACCESS EXCLUSIVE MODE;

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

CREATE TABLE chunkd.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    public_id        uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    kind             text NOT NULL CHECK (length(kind) BETWEEN 1 AND 200),
    payload          jsonb NOT NULL DEFAULT '{}',
    max_concurrency  int CHECK (max_concurrency IS NULL OR max_concurrency >= 1),
    max_attempts     int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    priority         int NOT NULL DEFAULT 0,
    total_chunks     int NOT NULL CHECK (total_chunks >= 1),
    -- Terminal chunks so far, kept by the statements that make them terminal. Not indexed, so
    -- those updates are HOT (fillfactor leaves room on the page).
    completed_chunks int NOT NULL DEFAULT 0,
    failed_chunks    int NOT NULL DEFAULT 0,
    cancelled_chunks int NOT NULL DEFAULT 0,
    cancelled_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    -- Set by the statement that makes the last chunk terminal.
    finished_at      timestamptz,
    CHECK (completed_chunks + failed_chunks + cancelled_chunks <= total_chunks)
) WITH (fillfactor = 50);

-- Limited jobs that may still have work: the claim's slow path reads these; when there are
-- none (of the claimer's kinds), claims take the fast path.
CREATE INDEX jobs_limited_active ON chunkd.jobs (priority DESC, created_at)
    WHERE max_concurrency IS NOT NULL AND finished_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX jobs_created ON chunkd.jobs (created_at);
CREATE INDEX jobs_finished ON chunkd.jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE chunkd.chunks (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint NOT NULL REFERENCES chunkd.jobs (id) ON DELETE CASCADE,
    seq        int NOT NULL CHECK (seq >= 0),
    queue_id   uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    chunk_id   uuid NOT NULL DEFAULT gen_random_uuid(),
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Enqueued under schema version 1: its 'enqueued' audit row is in events_v1.
    legacy     boolean NOT NULL DEFAULT false,
    UNIQUE (job_id, seq)
);
-- The seed's "newest rows first" check reads this, not every chunk ever enqueued.
CREATE INDEX chunks_created ON chunkd.chunks (created_at);

CREATE TABLE chunkd.ready (
    chunk_id bigint PRIMARY KEY,
    job_id   bigint NOT NULL,
    seq      int NOT NULL,
    priority int NOT NULL,
    kind     text NOT NULL,
    limited  boolean NOT NULL,
    claims   int NOT NULL DEFAULT 0,  -- attempts rows of this chunk so far (the next is claims + 1)
    attempt  int NOT NULL DEFAULT 0   -- attempts spent against max_attempts (v1's `attempts`)
);
-- Claiming unlimited jobs: ordering by seq across jobs of equal priority interleaves them
-- (every job's chunk 0, then every job's chunk 1, ...), so a small job is never starved by a
-- huge one.
CREATE INDEX ready_claim ON chunkd.ready (priority DESC, seq) WHERE NOT limited;
-- A limited job's window, and cancel.
CREATE INDEX ready_by_job ON chunkd.ready (job_id, seq);

CREATE TABLE chunkd.scheduled (
    chunk_id bigint PRIMARY KEY,
    job_id   bigint NOT NULL,
    seq      int NOT NULL,
    priority int NOT NULL,
    kind     text NOT NULL,
    limited  boolean NOT NULL,
    claims   int NOT NULL,
    attempt  int NOT NULL,
    run_at   timestamptz NOT NULL
);
CREATE INDEX scheduled_due ON chunkd.scheduled (run_at);
CREATE INDEX scheduled_by_job ON chunkd.scheduled (job_id, seq);

CREATE TABLE chunkd.attempts (
    chunk_id         bigint NOT NULL,
    n                int NOT NULL,      -- this chunk's n-th claim: with chunk_id, the key
    attempt          int NOT NULL,      -- attempts spent, this one included: the public number
    job_id           bigint NOT NULL,
    limited          boolean NOT NULL,
    worker_id        text NOT NULL,
    claimed_at       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    ended_at         timestamptz,
    outcome          text CHECK (outcome IN ('completed', 'failed', 'retry_scheduled', 'reaped',
                                             'released', 'cancelled')),
    final            boolean,           -- the chunk is terminal after this attempt
    result           jsonb,
    error            text,
    -- Claimed under schema version 1: its 'claimed' audit row is in events_v1.
    legacy           boolean NOT NULL DEFAULT false,
    -- Ended iff it has an outcome. Fences test `outcome IS NULL` while the indexes below test
    -- `ended_at`, so a completion's plan can only be the primary key, whatever the (always
    -- stale) statistics of a queue table say.
    CHECK ((ended_at IS NULL) = (outcome IS NULL) AND (ended_at IS NULL) = (final IS NULL)),
    PRIMARY KEY (chunk_id, n)
) WITH (fillfactor = 70);
-- The reaper, heartbeats of a whole worker, and "is anything of this job in flight".
CREATE INDEX attempts_open ON chunkd.attempts (lease_expires_at) WHERE ended_at IS NULL;
-- max_concurrency: open attempts of limited jobs, counted per job by the claim's slow path.
CREATE INDEX attempts_open_limited ON chunkd.attempts (job_id)
    WHERE limited AND ended_at IS NULL;
-- A job's recent errors (`chunkd status JOB`): failures only, so completions write nothing here.
CREATE INDEX attempts_errors ON chunkd.attempts (job_id) WHERE error IS NOT NULL;

CREATE TABLE chunkd.events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id    bigint NOT NULL,
    chunk_id  bigint,
    event     text NOT NULL CHECK (event IN ('cancelled', 'retried')),
    status    text NOT NULL,
    attempt   int NOT NULL,
    worker_id text,
    error     text,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX events_by_job ON chunkd.events (job_id);
-- A chunk cancelled while pending is cancelled for good, whatever its last attempt was.
CREATE INDEX events_cancelled ON chunkd.events (chunk_id) WHERE event = 'cancelled';

-- The final state of chunks that were finished under schema version 1 (their attempts were not
-- recorded one by one; their transitions are in events_v1).
CREATE TABLE chunkd.legacy_outcomes (
    chunk_id     bigint PRIMARY KEY,
    status       text NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    attempt      int NOT NULL,
    worker_id    text,
    started_at   timestamptz,
    completed_at timestamptz,
    error        text,
    result       jsonb
);

-- ---------------------------------------------------------------------------------------------
-- Version 1 data
-- ---------------------------------------------------------------------------------------------

INSERT INTO chunkd.jobs (public_id, kind, payload, max_concurrency, max_attempts, priority,
                         total_chunks, completed_chunks, failed_chunks, cancelled_chunks,
                         cancelled_at, created_at, started_at, finished_at)
SELECT j.id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority, j.total_chunks,
       count(*) FILTER (WHERE q.status = 'completed'),
       count(*) FILTER (WHERE q.status = 'failed'),
       count(*) FILTER (WHERE q.status = 'cancelled'),
       j.cancelled_at, j.created_at, j.started_at,
       CASE WHEN count(*) FILTER (WHERE q.status IN ('pending', 'processing')) = 0
            THEN coalesce(j.finished_at, max(q.completed_at), j.created_at) END
FROM chunkd.sync_jobs j
JOIN chunkd.chunk_processing_queue q ON q.parent_sync_job_id = j.id
GROUP BY j.id
ORDER BY j.created_at, j.id;

INSERT INTO chunkd.chunks (job_id, seq, queue_id, chunk_id, payload, created_at, legacy)
SELECT nj.id, c.seq, q.id, c.id, c.payload, q.created_at, true
FROM chunkd.chunk_processing_queue q
JOIN chunkd.chunked_sync_jobs c ON c.id = q.chunk_id
JOIN chunkd.jobs nj ON nj.public_id = q.parent_sync_job_id
ORDER BY q.created_at, nj.id, c.seq;

INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, claims, attempt)
SELECT ch.id, ch.job_id, ch.seq, q.priority, q.kind, q.limited, q.attempts, q.attempts
FROM chunkd.chunk_processing_queue q JOIN chunkd.chunks ch ON ch.queue_id = q.id
WHERE q.status = 'pending' AND q.run_at <= now();

INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims, attempt,
                              run_at)
SELECT ch.id, ch.job_id, ch.seq, q.priority, q.kind, q.limited, q.attempts, q.attempts, q.run_at
FROM chunkd.chunk_processing_queue q JOIN chunkd.chunks ch ON ch.queue_id = q.id
WHERE q.status = 'pending' AND q.run_at > now();

-- Chunks in flight keep their lease, worker and attempt number: the version 1 holder's outcome
-- is still accepted, a stale one still refused.
INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id, claimed_at,
                             lease_expires_at, legacy)
SELECT ch.id, q.attempts, q.attempts, ch.job_id, q.limited, q.worker_id,
       coalesce(q.started_at, now()), coalesce(q.lease_expires_at, now()), true
FROM chunkd.chunk_processing_queue q JOIN chunkd.chunks ch ON ch.queue_id = q.id
WHERE q.status = 'processing';

INSERT INTO chunkd.legacy_outcomes (chunk_id, status, attempt, worker_id, started_at,
                                    completed_at, error, result)
SELECT ch.id, q.status, q.attempts, q.worker_id, q.started_at, q.completed_at,
       q.error_message, q.result
FROM chunkd.chunk_processing_queue q JOIN chunkd.chunks ch ON ch.queue_id = q.id
WHERE q.status IN ('completed', 'failed', 'cancelled');

-- A chunk whose version 1 retry is pending keeps the error that scheduled it visible, as before.
INSERT INTO chunkd.legacy_outcomes (chunk_id, status, attempt, worker_id, started_at,
                                    completed_at, error, result)
SELECT ch.id, 'failed', q.attempts, q.worker_id, q.started_at, NULL, q.error_message, NULL
FROM chunkd.chunk_processing_queue q JOIN chunkd.chunks ch ON ch.queue_id = q.id
WHERE q.status = 'pending' AND q.error_message IS NOT NULL;

-- The version 1 audit trail is kept as it was written, under its own name.
ALTER TABLE chunkd.chunk_events RENAME TO events_v1;
ALTER INDEX chunkd.chunk_events_by_job RENAME TO events_v1_by_job;

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

-- Durations are exact seconds. An interval with a day field ('1 day') added to a timestamptz
-- follows the session's TimeZone across a DST change (23 or 25 hours); this one never does.
CREATE FUNCTION chunkd.seconds(s float8) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN make_interval(secs => s);

CREATE FUNCTION chunkd.seconds_of(i interval) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN extract(epoch FROM i)::float8;

-- Exponential backoff with jitter, in seconds: the delay for a retry after `attempt` attempts
-- lies in [d/2, d] with d = least(cap, base * 2^(attempt-1)), so retries of many chunks spread.
CREATE FUNCTION chunkd.backoff_s(attempt int, base_s float8, cap_s float8) RETURNS float8
LANGUAGE sql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN least(cap_s, base_s * power(2, least(greatest(attempt - 1, 0), 60)))
       * (0.5 + random() * 0.5);

-- Adds terminal chunks to their jobs' counters, locking the job rows in id order (two
-- statements ending chunks of the same jobs never deadlock), and stamps finished_at on the
-- jobs whose last chunk this was. Callers have already ended the attempts (row locks on
-- attempts are always taken before the job's).
CREATE FUNCTION chunkd.count_terminal(job_ids bigint[], completed int[], failed int[],
                                      cancelled int[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF cardinality(job_ids) > 1 THEN
        PERFORM 1 FROM chunkd.jobs j WHERE j.id = ANY (job_ids) ORDER BY j.id
        FOR NO KEY UPDATE;
    END IF;
    UPDATE chunkd.jobs j
    SET completed_chunks = j.completed_chunks + d.completed,
        failed_chunks = j.failed_chunks + d.failed,
        cancelled_chunks = j.cancelled_chunks + d.cancelled,
        finished_at = CASE
            WHEN j.finished_at IS NULL
                 AND j.completed_chunks + j.failed_chunks + j.cancelled_chunks
                     + d.completed + d.failed + d.cancelled >= j.total_chunks
            THEN now() ELSE j.finished_at END
    FROM unnest(job_ids, completed, failed, cancelled) AS d(job_id, completed, failed, cancelled)
    WHERE j.id = d.job_id;
END;
$$;

-- Due scheduled chunks join the ready queue (claims call this first; cheap when none is due).
CREATE FUNCTION chunkd.promote_due() RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkd.scheduled s WHERE s.run_at <= now()) THEN
        RETURN 0;
    END IF;
    WITH due AS (
        DELETE FROM chunkd.scheduled s
        WHERE s.ctid = ANY (ARRAY(
            SELECT x.ctid FROM chunkd.scheduled x WHERE x.run_at <= now()
            ORDER BY x.run_at LIMIT 10000 FOR UPDATE SKIP LOCKED))
        RETURNING s.*
    ), moved AS (
        INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, claims, attempt)
        SELECT d.chunk_id, d.job_id, d.seq, d.priority, d.kind, d.limited, d.claims, d.attempt
        FROM due d
        RETURNING 1
    )
    SELECT count(*) INTO n FROM moved;
    RETURN n;
END;
$$;

-- Requeues chunks: due now to `ready`, later to `scheduled`. One row per chunk.
CREATE FUNCTION chunkd.requeue(chunk_ids bigint[], claims int[], attempts int[],
                               run_in_s float8[])
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH input AS (
        SELECT i.chunk_id, i.claims, i.attempt, i.run_in_s, c.job_id, c.seq, j.priority, j.kind,
               j.max_concurrency IS NOT NULL AS limited
        FROM unnest(chunk_ids, claims, attempts, run_in_s)
             AS i(chunk_id, claims, attempt, run_in_s)
        JOIN chunkd.chunks c ON c.id = i.chunk_id
        JOIN chunkd.jobs j ON j.id = c.job_id
    ), now_due AS (
        INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, claims, attempt)
        SELECT i.chunk_id, i.job_id, i.seq, i.priority, i.kind, i.limited, i.claims, i.attempt
        FROM input i WHERE coalesce(i.run_in_s, 0) <= 0
    )
    INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims,
                                  attempt, run_at)
    SELECT i.chunk_id, i.job_id, i.seq, i.priority, i.kind, i.limited, i.claims, i.attempt,
           now() + chunkd.seconds(i.run_in_s)
    FROM input i WHERE i.run_in_s > 0;
END;

-- A chunk's state, derived from where its rows are: in ready or scheduled = pending; an open
-- attempt = processing; cancelled if a cancel took it from the queue (even after an operator
-- retry of a failed attempt); otherwise the outcome of its last attempt if that was final (or
-- its version 1 outcome), and cancelled if it left the queue without one.
CREATE VIEW chunkd.chunk_state AS
SELECT
    c.id,
    c.job_id,
    c.seq,
    CASE
        WHEN p.attempt IS NOT NULL THEN 'pending'
        WHEN la.n IS NOT NULL AND la.ended_at IS NULL THEN 'processing'
        WHEN EXISTS (SELECT 1 FROM chunkd.events e
                     WHERE e.chunk_id = c.id AND e.event = 'cancelled') THEN 'cancelled'
        WHEN la.n IS NOT NULL AND la.final THEN
            CASE la.outcome WHEN 'completed' THEN 'completed' WHEN 'cancelled' THEN 'cancelled'
                            ELSE 'failed' END
        WHEN la.n IS NULL AND lo.status IS NOT NULL AND lo.completed_at IS NOT NULL THEN lo.status
        ELSE 'cancelled'
    END AS status,
    coalesce(p.attempt, la.attempt, lo.attempt, 0) AS attempts,
    coalesce(p.claims, la.n, lo.attempt, 0) AS claims,
    p.run_at,
    coalesce(la.claimed_at, lo.started_at) AS started_at,
    CASE WHEN la.n IS NOT NULL THEN la.ended_at ELSE lo.completed_at END AS ended_at,
    CASE WHEN la.n IS NOT NULL THEN la.error ELSE lo.error END AS error,
    coalesce(la.worker_id, lo.worker_id) AS worker_id,
    CASE WHEN la.ended_at IS NULL THEN la.lease_expires_at END AS lease_expires_at,
    CASE WHEN la.n IS NOT NULL THEN la.result ELSE lo.result END AS result
FROM chunkd.chunks c
LEFT JOIN LATERAL (
    SELECT now() AS run_at, r.attempt, r.claims FROM chunkd.ready r WHERE r.chunk_id = c.id
    UNION ALL
    SELECT s.run_at, s.attempt, s.claims FROM chunkd.scheduled s WHERE s.chunk_id = c.id
) p ON true
LEFT JOIN LATERAL (
    SELECT a.* FROM chunkd.attempts a WHERE a.chunk_id = c.id ORDER BY a.n DESC LIMIT 1
) la ON true
LEFT JOIN chunkd.legacy_outcomes lo ON lo.chunk_id = c.id;

-- ---------------------------------------------------------------------------------------------
-- Enqueue
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION chunkd.create_sync_job(
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
    job_id bigint;
    public_id uuid;
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

    INSERT INTO chunkd.jobs (kind, payload, max_concurrency, max_attempts, priority, total_chunks)
    VALUES (kind, coalesce(payload, '{}'), max_concurrency, max_attempts,
            coalesce(priority, 0), n)
    RETURNING jobs.id, jobs.public_id INTO job_id, public_id;

    -- One statement for chunks and ready rows: one NOTIFY for the whole job.
    WITH c AS (
        INSERT INTO chunkd.chunks (job_id, seq, payload)
        SELECT job_id, (e.ordinality - 1)::int, e.value
        FROM jsonb_array_elements(chunks) WITH ORDINALITY AS e(value, ordinality)
        RETURNING chunks.id, chunks.seq
    )
    INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited)
    SELECT c.id, job_id, c.seq, coalesce(priority, 0), kind, max_concurrency IS NOT NULL
    FROM c;

    RETURN public_id;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Claim
-- ---------------------------------------------------------------------------------------------

-- The daemon's claim: `id` is the chunk's internal key, used for its outcome. One statement on
-- the fast path (no limited job of these kinds is active): delete the picked ready rows, insert
-- their attempts, return the payloads.
CREATE FUNCTION chunkd.claim_chunks(
    worker_id text,
    batch_size int,
    kinds text[],
    lease_s float8
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
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
    p_worker text := claim_chunks.worker_id;
    p_batch int := claim_chunks.batch_size;
    p_kinds text[] := claim_chunks.kinds;
    p_until timestamptz;
BEGIN
    IF p_worker IS NULL OR length(p_worker) = 0 THEN
        RAISE EXCEPTION 'chunkd: worker_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'chunkd: batch_size must be >= 1, got %', p_batch USING ERRCODE = '22023';
    END IF;
    IF lease_s IS NULL OR NOT lease_s > 0 OR lease_s = 'Infinity' THEN
        RAISE EXCEPTION 'chunkd: lease must be a positive number of seconds' USING ERRCODE = '22023';
    END IF;
    p_until := now() + chunkd.seconds(lease_s);
    PERFORM chunkd.promote_due();

    IF EXISTS (SELECT 1 FROM chunkd.jobs j
               WHERE j.max_concurrency IS NOT NULL AND j.finished_at IS NULL
                 AND j.cancelled_at IS NULL AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))) THEN
        RETURN QUERY SELECT * FROM chunkd.claim_limited(p_worker, p_batch, p_kinds, p_until);
        RETURN;
    END IF;

    RETURN QUERY
    WITH del AS (
        -- ctid is safe here: ready rows are never updated, and the lock is held until DELETE.
        DELETE FROM chunkd.ready r
        WHERE r.ctid = ANY (ARRAY(
            SELECT q.ctid FROM chunkd.ready q
            WHERE NOT q.limited AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
            ORDER BY q.priority DESC, q.seq
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED))
        RETURNING r.chunk_id, r.job_id, r.seq, r.priority, r.kind, r.limited, r.claims, r.attempt
    ), ins AS (
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     lease_expires_at)
        SELECT d.chunk_id, d.claims + 1, d.attempt + 1, d.job_id, d.limited, p_worker, p_until
        FROM del d
    ), started AS (
        UPDATE chunkd.jobs j SET started_at = now()
        WHERE j.id IN (SELECT d.job_id FROM del d) AND j.started_at IS NULL
    )
    SELECT d.chunk_id, c.queue_id, c.chunk_id, j.public_id, d.seq, d.attempt + 1, d.kind,
           c.payload, j.payload, p_until
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.seq;
END;
$$;

-- The slow path, taken while a limited job of the claimer's kinds is active.
--
-- A limited job offers the first (max_concurrency - in flight) of its pending chunks in seq
-- order (ready and scheduled alike, so a chunk waiting for its retry keeps its place and
-- max_concurrency = 1 runs strictly in seq order), and only those already due. Only jobs with
-- a free slot and a due chunk in that window are considered, ordered like the unlimited ones
-- (priority, then the seq of their next chunk), so a small limited job is not stuck behind big
-- ones and no slot idles while a job has runnable chunks. Every claimer of a limited job holds
-- its row lock and counts its attempts only after taking it (the next statement takes a fresh
-- snapshot), so concurrent claimers can never exceed the limit. SKIP LOCKED: never wait on
-- another claimer; its NOTIFY or our poll brings us back.
CREATE FUNCTION chunkd.claim_limited(
    p_worker text,
    p_batch int,
    p_kinds text[],
    p_until timestamptz
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    locked_jobs bigint[];
BEGIN
    SELECT array_agg(l.id) INTO locked_jobs
    FROM (
        SELECT j.id
        FROM (
            SELECT j.id, j.priority, j.created_at, w.first_seq
            FROM chunkd.jobs j
            CROSS JOIN LATERAL (
                SELECT j.max_concurrency - (
                    SELECT count(*) FROM chunkd.attempts a
                    WHERE a.job_id = j.id AND a.limited AND a.ended_at IS NULL) AS free
            ) f
            CROSS JOIN LATERAL (
                SELECT min(x.seq) FILTER (WHERE x.due) AS first_seq
                FROM (
                    SELECT y.seq, y.due FROM (
                        SELECT r.seq, true AS due FROM chunkd.ready r WHERE r.job_id = j.id
                        UNION ALL
                        SELECT s.seq, false FROM chunkd.scheduled s WHERE s.job_id = j.id
                    ) y
                    ORDER BY y.seq
                    LIMIT greatest(f.free, 0)
                ) x
            ) w
            WHERE j.max_concurrency IS NOT NULL AND j.finished_at IS NULL
              AND j.cancelled_at IS NULL AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
              AND f.free > 0 AND w.first_seq IS NOT NULL
        ) cand
        JOIN chunkd.jobs j ON j.id = cand.id
        ORDER BY cand.priority DESC, cand.first_seq, cand.created_at
        LIMIT p_batch
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) l;

    RETURN QUERY
    WITH lim AS (
        SELECT w.chunk_id, w.priority, w.seq
        FROM chunkd.jobs j
        CROSS JOIN LATERAL (
            SELECT y.chunk_id, y.priority, y.seq, y.due FROM (
                SELECT r.chunk_id, r.priority, r.seq, true AS due
                FROM chunkd.ready r WHERE r.job_id = j.id
                UNION ALL
                SELECT s.chunk_id, s.priority, s.seq, false
                FROM chunkd.scheduled s WHERE s.job_id = j.id
            ) y
            ORDER BY y.seq
            LIMIT greatest(0, j.max_concurrency - (
                SELECT count(*) FROM chunkd.attempts a
                WHERE a.job_id = j.id AND a.limited AND a.ended_at IS NULL))
        ) w
        WHERE j.id = ANY (locked_jobs) AND w.due
    ), unl AS (
        SELECT q.chunk_id, q.priority, q.seq
        FROM chunkd.ready q
        WHERE NOT q.limited AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
        ORDER BY q.priority DESC, q.seq
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT c.chunk_id
        FROM (SELECT * FROM lim UNION ALL SELECT * FROM unl) c
        ORDER BY c.priority DESC, c.seq
        LIMIT p_batch
    ), del AS (
        DELETE FROM chunkd.ready r
        WHERE r.chunk_id = ANY (ARRAY(SELECT p.chunk_id FROM picked p))
        RETURNING r.chunk_id, r.job_id, r.seq, r.priority, r.kind, r.limited, r.claims, r.attempt
    ), ins AS (
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     lease_expires_at)
        SELECT d.chunk_id, d.claims + 1, d.attempt + 1, d.job_id, d.limited, p_worker, p_until
        FROM del d
    ), started AS (
        UPDATE chunkd.jobs j SET started_at = now()
        WHERE j.id IN (SELECT d.job_id FROM del d) AND j.started_at IS NULL
    )
    SELECT d.chunk_id, c.queue_id, c.chunk_id, j.public_id, d.seq, d.attempt + 1, d.kind,
           c.payload, j.payload, p_until
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.seq;
END;
$$;

-- The public claim (the seed's name): as claim_chunks, with the lease as an interval.
CREATE OR REPLACE FUNCTION chunkd.claim_next_chunk_job_safe(
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
BEGIN
    IF lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION 'chunkd: lease must be a positive interval' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT c.queue_id, c.chunk_id, c.sync_job_id, c.seq, c.attempt, c.kind, c.payload,
           c.job_payload, c.lease_expires_at
    FROM chunkd.claim_chunks(claim_next_chunk_job_safe.worker_id,
                             claim_next_chunk_job_safe.batch_size,
                             claim_next_chunk_job_safe.kinds,
                             chunkd.seconds_of(claim_next_chunk_job_safe.lease)) c;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Outcomes (all fenced: only the holder of the open attempt may report)
-- ---------------------------------------------------------------------------------------------

-- The daemon's batch completion, by internal id; returns the ids whose completion was accepted.
-- Fenced on (chunk, attempt, worker, still open). SET enable_seqscan = off: the attempts table
-- was analyzed when nearly empty, and a stale estimate must never turn a batch into a scan or
-- an O(batch^2) join (design study, "pitfalls"); array_position keeps it one primary-key scan.
CREATE FUNCTION chunkd.complete_attempts(
    worker_id text,
    ids bigint[],
    attempts int[],
    results jsonb[] DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    p_worker text := complete_attempts.worker_id;
    p_ids bigint[] := complete_attempts.ids;
    p_attempts int[] := complete_attempts.attempts;
    p_results jsonb[] := complete_attempts.results;
    done_ids bigint[];
    job_ids bigint[];
    counts int[];
BEGIN
    WITH done AS (
        UPDATE chunkd.attempts a
        SET ended_at = now(), outcome = 'completed', final = true,
            result = p_results[array_position(p_ids, a.chunk_id)]
        WHERE a.chunk_id = ANY (p_ids)
          AND a.attempt = p_attempts[array_position(p_ids, a.chunk_id)]
          AND a.worker_id = p_worker AND a.outcome IS NULL
        RETURNING a.chunk_id, a.job_id
    ), by_job AS (
        SELECT d.job_id, count(*)::int AS n, array_agg(d.chunk_id) AS ids
        FROM done d GROUP BY d.job_id
    )
    SELECT array_agg(b.job_id ORDER BY b.job_id), array_agg(b.n ORDER BY b.job_id),
           (SELECT array_agg(x) FROM by_job b2, unnest(b2.ids) x)
    INTO job_ids, counts, done_ids
    FROM by_job b;
    IF job_ids IS NOT NULL THEN
        PERFORM chunkd.count_terminal(job_ids, counts,
                                      array_fill(0, ARRAY[cardinality(job_ids)]),
                                      array_fill(0, ARRAY[cardinality(job_ids)]));
        RETURN QUERY SELECT unnest(done_ids);
    END IF;
END;
$$;

-- The batch form by public queue id (schema version 1's daemon called it; kept for it and for
-- callers in other languages).
CREATE OR REPLACE FUNCTION chunkd.complete_chunks(
    worker_id text,
    queue_ids uuid[],
    attempts int[],
    results jsonb[] DEFAULT NULL
) RETURNS SETOF uuid
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH input AS (
        SELECT c.id, i.attempt, i.result, c.queue_id
        FROM unnest(complete_chunks.queue_ids, complete_chunks.attempts,
                    coalesce(complete_chunks.results,
                             array_fill(NULL::jsonb,
                                        ARRAY[cardinality(complete_chunks.queue_ids)])))
             AS i(queue_id, attempt, result)
        JOIN chunkd.chunks c ON c.queue_id = i.queue_id
    ), done AS (
        SELECT d.id
        FROM chunkd.complete_attempts(
            complete_chunks.worker_id,
            (SELECT array_agg(i.id) FROM input i),
            (SELECT array_agg(i.attempt) FROM input i),
            (SELECT array_agg(i.result) FROM input i)) AS d(id)
    )
    SELECT i.queue_id FROM input i JOIN done d ON d.id = i.id;
END;

CREATE OR REPLACE FUNCTION chunkd.complete_chunk_job_safe(
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

-- The daemon's failure report, by internal id. Returns the chunk's new status ('pending' =
-- retry scheduled, 'failed'), or NULL when fenced out. retry_in_s overrides the backoff (a
-- handler's RetryLater); base_s and cap_s tune it.
CREATE FUNCTION chunkd.fail_attempt(
    worker_id text,
    id bigint,
    attempt int,
    error text,
    retryable boolean DEFAULT true,
    retry_in_s float8 DEFAULT NULL,
    base_s float8 DEFAULT 2,
    cap_s float8 DEFAULT 600
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ended record;
BEGIN
    UPDATE chunkd.attempts a
    SET ended_at = now(), error = chunkd.clip_error(fail_attempt.error),
        outcome = CASE WHEN coalesce(fail_attempt.retryable, true) AND a.attempt < j.max_attempts
                       THEN 'retry_scheduled' ELSE 'failed' END,
        final = NOT (coalesce(fail_attempt.retryable, true) AND a.attempt < j.max_attempts)
    FROM chunkd.jobs j
    WHERE a.chunk_id = fail_attempt.id AND a.attempt = fail_attempt.attempt
      AND a.worker_id = fail_attempt.worker_id AND a.outcome IS NULL AND j.id = a.job_id
    RETURNING a.chunk_id, a.n, a.attempt, a.job_id, a.final INTO ended;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF ended.final THEN
        PERFORM chunkd.count_terminal(ARRAY[ended.job_id], ARRAY[0], ARRAY[1], ARRAY[0]);
        RETURN 'failed';
    END IF;
    PERFORM chunkd.requeue(
        ARRAY[ended.chunk_id], ARRAY[ended.n], ARRAY[ended.attempt],
        ARRAY[coalesce(retry_in_s, chunkd.backoff_s(ended.attempt, base_s, cap_s))]);
    RETURN 'pending';
END;
$$;

-- The public failure report (the seed's name), by queue id, with intervals.
CREATE OR REPLACE FUNCTION chunkd.fail_chunk_job_safe(
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
    SELECT chunkd.fail_attempt(
        fail_chunk_job_safe.worker_id, c.id, fail_chunk_job_safe.attempt,
        fail_chunk_job_safe.error, fail_chunk_job_safe.retryable,
        chunkd.seconds_of(fail_chunk_job_safe.retry_in),
        chunkd.seconds_of(fail_chunk_job_safe.backoff_base),
        chunkd.seconds_of(fail_chunk_job_safe.backoff_cap))
    FROM chunkd.chunks c WHERE c.queue_id = fail_chunk_job_safe.queue_id;
END;

-- Extends the leases the caller still holds; returns the ids it still holds (a chunk missing
-- from the answer was reaped, cancelled or finished: its handler should stop).
CREATE FUNCTION chunkd.renew_leases(
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
CREATE FUNCTION chunkd.release_attempts(
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

-- ---------------------------------------------------------------------------------------------
-- Maintenance
-- ---------------------------------------------------------------------------------------------

-- Chunks whose lease expired (their worker died or hung) go back to the queue, or fail when out
-- of attempts. The lease is re-checked on the locked row, so a lease renewed meanwhile
-- survives; SKIP LOCKED makes concurrent reapers (cron plus many daemons) split the work.
CREATE OR REPLACE FUNCTION chunkd.cleanup_stuck_chunks() RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
    r_ids bigint[];
    r_claims int[];
    r_attempts int[];
    f_jobs bigint[];
    f_counts int[];
BEGIN
    WITH expired AS (
        SELECT a.chunk_id, a.n
        FROM chunkd.attempts a
        WHERE a.ended_at IS NULL AND a.lease_expires_at < now()
        FOR UPDATE SKIP LOCKED
    ), reaped AS (
        UPDATE chunkd.attempts a
        SET ended_at = now(), outcome = 'reaped', error = 'lease expired',
            final = a.attempt >= j.max_attempts
        FROM expired e, chunkd.jobs j
        WHERE a.chunk_id = e.chunk_id AND a.n = e.n AND j.id = a.job_id
          AND a.outcome IS NULL AND a.lease_expires_at < now()
        RETURNING a.chunk_id, a.n, a.attempt, a.job_id, a.final
    ), requeued AS (
        SELECT array_agg(r.chunk_id) AS ids, array_agg(r.n) AS claims,
               array_agg(r.attempt) AS attempts
        FROM reaped r WHERE NOT r.final
    ), failed AS (
        SELECT array_agg(f.job_id ORDER BY f.job_id) AS jobs, array_agg(f.n ORDER BY f.job_id) AS n
        FROM (SELECT r.job_id, count(*)::int AS n FROM reaped r WHERE r.final GROUP BY 1) f
    )
    SELECT (SELECT count(*) FROM reaped), q.ids, q.claims, q.attempts, f.jobs, f.n
    INTO n, r_ids, r_claims, r_attempts, f_jobs, f_counts
    FROM requeued q, failed f;
    IF r_ids IS NOT NULL THEN
        PERFORM chunkd.requeue(r_ids, r_claims, r_attempts,
                               array_fill(0::float8, ARRAY[cardinality(r_ids)]));
    END IF;
    IF f_jobs IS NOT NULL THEN
        PERFORM chunkd.count_terminal(f_jobs, array_fill(0, ARRAY[cardinality(f_jobs)]), f_counts,
                                      array_fill(0, ARRAY[cardinality(f_jobs)]));
    END IF;
    RETURN n;
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.cancel_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    n_pending int;
    n_running int;
BEGIN
    SELECT j.id INTO job FROM chunkd.jobs j WHERE j.public_id = sync_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    -- Pending chunks leave the queue; the event records who they were.
    WITH gone AS (
        DELETE FROM chunkd.ready r WHERE r.job_id = job RETURNING r.chunk_id, r.attempt
    ), gone_later AS (
        DELETE FROM chunkd.scheduled s WHERE s.job_id = job RETURNING s.chunk_id, s.attempt
    ), logged AS (
        INSERT INTO chunkd.events (job_id, chunk_id, event, status, attempt)
        SELECT job, g.chunk_id, 'cancelled', 'cancelled', g.attempt
        FROM (SELECT * FROM gone UNION ALL SELECT * FROM gone_later) g
        RETURNING 1
    )
    SELECT count(*) INTO n_pending FROM logged;
    -- In-flight chunks are cancelled too: their handlers may still finish, but the outcome is
    -- fenced out (the attempt is no longer open), so the job reaches its terminal state now.
    WITH cancelled AS (
        UPDATE chunkd.attempts a
        SET ended_at = now(), outcome = 'cancelled', final = true
        WHERE a.job_id = job AND a.ended_at IS NULL AND a.outcome IS NULL
        RETURNING 1
    )
    SELECT count(*) INTO n_running FROM cancelled;
    IF n_pending + n_running > 0 THEN
        UPDATE chunkd.jobs j SET cancelled_at = coalesce(j.cancelled_at, now()) WHERE j.id = job;
        PERFORM chunkd.count_terminal(ARRAY[job], ARRAY[0], ARRAY[0],
                                      ARRAY[n_pending + n_running]);
    END IF;
    RETURN n_pending + n_running;
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.retry_failed_chunks(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    job_cancelled timestamptz;
    r_ids bigint[];
    r_claims int[];
BEGIN
    SELECT j.id, j.cancelled_at INTO job, job_cancelled
    FROM chunkd.jobs j WHERE j.public_id = sync_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    IF job_cancelled IS NOT NULL THEN
        RAISE EXCEPTION 'chunkd: sync job % is cancelled; its chunks cannot be retried',
            sync_job_id USING ERRCODE = '55000';
    END IF;
    SELECT array_agg(s.id), array_agg(s.claims) INTO r_ids, r_claims
    FROM chunkd.chunk_state s WHERE s.job_id = job AND s.status = 'failed';
    IF r_ids IS NULL THEN
        RETURN 0;
    END IF;
    INSERT INTO chunkd.events (job_id, chunk_id, event, status, attempt)
    SELECT job, x, 'retried', 'pending', 0 FROM unnest(r_ids) x;
    PERFORM chunkd.requeue(r_ids, r_claims, array_fill(0, ARRAY[cardinality(r_ids)]),
                           array_fill(0::float8, ARRAY[cardinality(r_ids)]));
    UPDATE chunkd.jobs j
    SET failed_chunks = j.failed_chunks - cardinality(r_ids), finished_at = NULL
    WHERE j.id = job;
    RETURN cardinality(r_ids);
END;
$$;

-- Deletes jobs (with their chunks, attempts and audit rows) finished before now() - older_than.
CREATE OR REPLACE FUNCTION chunkd.purge_finished_jobs(older_than interval) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    doomed bigint[];
    doomed_public uuid[];
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'chunkd: older_than must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    SELECT array_agg(d.id), array_agg(d.public_id) INTO doomed, doomed_public
    FROM (
        SELECT j.id, j.public_id
        FROM chunkd.jobs j
        WHERE j.finished_at < now() - chunkd.seconds(chunkd.seconds_of(older_than))
        FOR UPDATE SKIP LOCKED
    ) d;
    IF doomed IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM chunkd.attempts a USING chunkd.chunks c
    WHERE c.job_id = ANY (doomed) AND a.chunk_id = c.id;
    DELETE FROM chunkd.legacy_outcomes o USING chunkd.chunks c
    WHERE c.job_id = ANY (doomed) AND o.chunk_id = c.id;
    DELETE FROM chunkd.events e WHERE e.job_id = ANY (doomed);
    DELETE FROM chunkd.events_v1 e WHERE e.sync_job_id = ANY (doomed_public);
    DELETE FROM chunkd.jobs j WHERE j.id = ANY (doomed);  -- chunks go with it (ON DELETE CASCADE)
    RETURN cardinality(doomed);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Notifications
-- ---------------------------------------------------------------------------------------------

-- NOTIFY when work became runnable: chunks joined the ready queue (enqueue, retry, release,
-- reap, operator retry), a chunk was scheduled for later (the payload is how many seconds until
-- it is due, by the database clock, so a daemon arms a timer instead of polling), or a chunk of
-- a limited job left 'processing' and freed a slot. One notification per statement for
-- inserts; the row trigger on attempts has a WHEN clause that is false for unlimited jobs, so
-- the hot path pays nothing.
CREATE OR REPLACE FUNCTION chunkd.trigger_next_chunk_processing() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_at timestamptz;
BEGIN
    IF TG_TABLE_NAME = 'ready' THEN
        IF EXISTS (SELECT 1 FROM new_rows) THEN
            PERFORM pg_notify('chunkd', '0');
        END IF;
    ELSIF TG_TABLE_NAME = 'scheduled' THEN
        SELECT min(n.run_at) INTO next_at FROM new_rows n;
        IF next_at IS NOT NULL THEN
            PERFORM pg_notify('chunkd',
                              greatest(0, round(extract(epoch FROM next_at - now()), 3))::text);
        END IF;
    ELSE
        PERFORM pg_notify('chunkd', '0');  -- a slot of a limited job was freed
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER ready_notify
    AFTER INSERT ON chunkd.ready
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

CREATE TRIGGER scheduled_notify
    AFTER INSERT ON chunkd.scheduled
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

CREATE TRIGGER attempts_slot_freed
    AFTER UPDATE ON chunkd.attempts
    FOR EACH ROW
    WHEN (NEW.limited AND OLD.ended_at IS NULL AND NEW.ended_at IS NOT NULL)
    EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

-- ---------------------------------------------------------------------------------------------
-- Monitoring
-- ---------------------------------------------------------------------------------------------

-- The view is rebuilt over the new tables; the function that reads it is released from the
-- old one first (its grants stay: it is replaced, not dropped).
CREATE OR REPLACE FUNCTION chunkd.get_sync_job_progress(sync_job_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN NULL::jsonb;
DROP VIEW chunkd.chunk_processing_status;

-- Per job: pending is counted from the queue tables (only live rows are there), terminal chunks
-- come from the job's counters, processing is the rest. O(pending), never O(history).
CREATE VIEW chunkd.chunk_processing_status AS
SELECT
    j.public_id AS parent_sync_job_id,
    j.kind,
    j.total_chunks,
    c.pending::int AS pending_chunks,
    (j.total_chunks - c.pending - j.completed_chunks - j.failed_chunks
     - j.cancelled_chunks)::int AS processing_chunks,
    j.completed_chunks,
    j.failed_chunks,
    j.cancelled_chunks,
    CASE
        WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN j.finished_at IS NULL THEN
            CASE WHEN j.started_at IS NULL THEN 'pending' ELSE 'processing' END
        WHEN j.failed_chunks > 0 THEN 'partial_failure'
        WHEN j.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END AS overall_status,
    round((j.completed_chunks + j.failed_chunks + j.cancelled_chunks) * 100.0
          / j.total_chunks, 2) AS progress_percentage,
    j.created_at,
    j.started_at,
    j.finished_at
FROM chunkd.jobs j
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
           + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id) AS pending
) c;

CREATE OR REPLACE FUNCTION chunkd.get_sync_job_progress(sync_job_id uuid) RETURNS jsonb
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

-- Seconds until the earliest pending chunk of these kinds is due (database clock), or NULL.
CREATE OR REPLACE FUNCTION chunkd.next_due_in(kinds text[] DEFAULT NULL) RETURNS float8
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM chunkd.ready r
                     WHERE next_due_in.kinds IS NULL OR r.kind = ANY (next_due_in.kinds))
        THEN 0::float8
        ELSE (SELECT greatest(0, extract(epoch FROM min(s.run_at) - now()))::float8
              FROM chunkd.scheduled s
              WHERE next_due_in.kinds IS NULL OR s.kind = ANY (next_due_in.kinds))
    END;
END;

-- Live queue depth for metrics: pending (due now), scheduled (waiting for a retry) and
-- processing. Reads only live rows, never the finished history.
CREATE OR REPLACE FUNCTION chunkd.queue_depth()
RETURNS TABLE (status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT 'pending', count(*) FROM chunkd.ready
    UNION ALL
    SELECT 'scheduled', count(*) FROM chunkd.scheduled
    UNION ALL
    SELECT 'processing', count(*) FROM chunkd.attempts a WHERE a.ended_at IS NULL;
END;

-- ---------------------------------------------------------------------------------------------
-- The seed's objects, by name
-- ---------------------------------------------------------------------------------------------

DROP FUNCTION chunkd.job_finished_at(uuid);
DROP FUNCTION chunkd.retry_delay(int, interval, interval);
DROP TABLE chunkd.chunk_processing_queue;
DROP TABLE chunkd.chunked_sync_jobs;
DROP TABLE chunkd.sync_jobs;

CREATE VIEW chunkd.sync_jobs AS
SELECT j.public_id AS id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority,
       j.total_chunks, j.cancelled_at, j.created_at, j.started_at, j.finished_at
FROM chunkd.jobs j;

CREATE VIEW chunkd.chunked_sync_jobs AS
SELECT c.chunk_id AS id, j.public_id AS sync_job_id, c.seq, c.payload
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id;

CREATE VIEW chunkd.chunk_processing_queue AS
SELECT
    c.queue_id AS id,
    c.chunk_id,
    j.public_id AS parent_sync_job_id,
    s.status,
    s.attempts,
    j.max_attempts,
    c.created_at,
    s.started_at,
    CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN s.ended_at END AS completed_at,
    s.error AS error_message,
    s.worker_id,
    coalesce(s.run_at, c.created_at) AS run_at,
    s.lease_expires_at,
    s.result,
    c.seq,
    j.kind,
    j.priority
FROM chunkd.chunks c
JOIN chunkd.jobs j ON j.id = c.job_id
JOIN chunkd.chunk_state s ON s.id = c.id;

-- The audit trail: one row per transition. Enqueued = the chunk row; claimed and its outcome =
-- the attempts row; cancel of a pending chunk and operator retry = events; transitions written
-- under schema version 1 = events_v1, as they were.
CREATE VIEW chunkd.chunk_events AS
SELECT c.queue_id, j.public_id AS sync_job_id, 'enqueued'::text AS event, 'pending'::text AS status,
       0 AS attempt, NULL::text AS worker_id, NULL::text AS error, c.created_at AS at
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id
WHERE NOT c.legacy
UNION ALL
SELECT c.queue_id, j.public_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE NOT a.legacy
UNION ALL
SELECT c.queue_id, j.public_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome = 'released' THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT c.queue_id, j.public_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id LEFT JOIN chunkd.chunks c ON c.id = e.chunk_id
UNION ALL
SELECT v.queue_id, v.sync_job_id, v.event, v.status, v.attempt, v.worker_id, v.error, v.at
FROM chunkd.events_v1 v;

-- Nothing is granted to PUBLIC: functions are executable by PUBLIC by default, so revoke.
REVOKE ALL ON ALL TABLES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkd FROM PUBLIC;

-- Roles that could run the version 1 daemon can run this one: whoever holds EXECUTE on a
-- version 1 function gets it on the function that took over its job for the daemon.
DO $$
DECLARE
    pair record;
    grantee text;
BEGIN
    FOR pair IN
        SELECT * FROM (VALUES
            ('chunkd.claim_next_chunk_job_safe(text, int, text[], interval)',
             'chunkd.claim_chunks(text, int, text[], float8)'),
            ('chunkd.complete_chunks(text, uuid[], int[], jsonb[])',
             'chunkd.complete_attempts(text, bigint[], int[], jsonb[])'),
            ('chunkd.fail_chunk_job_safe(uuid, text, int, text, boolean, interval, interval, interval)',
             'chunkd.fail_attempt(text, bigint, int, text, boolean, float8, float8, float8)'),
            ('chunkd.heartbeat_chunks(text, uuid[], interval)',
             'chunkd.renew_leases(text, bigint[], float8)'),
            ('chunkd.release_chunks(text, uuid[])',
             'chunkd.release_attempts(text, bigint[])')
        ) AS p(old_sig, new_sig)
    LOOP
        FOR grantee IN
            SELECT DISTINCT r.rolname
            FROM pg_catalog.pg_proc f
            CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
            JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
            WHERE f.oid = pair.old_sig::regprocedure AND acl.privilege_type = 'EXECUTE'
              AND acl.grantee <> f.proowner
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', pair.new_sig, grantee);
        END LOOP;
    END LOOP;
END;
$$;
