-- chunkd schema version 6: flow control. Pause and resume a job or a kind, rate limits per kind
-- and per job (token buckets enforced by the claim, shared by every daemon on every host), and
-- concurrency shared by the jobs of one key (a tenant, an account).
--
-- Flow control costs nothing for those who do not use it: the claim's fast path stays the one
-- statement of schema version 2, gated by a one-time check ("is any job of these kinds paused,
-- rate-limited, keyed or concurrency-limited, or any of these kinds paused or rate-limited?",
-- two probes of empty or tiny indexes) that runs inside that statement.
--
--   jobs               + paused_at, max_per_second, concurrency_key;
--   kind_flow          one row per kind that is paused or rate-limited (and its token bucket);
--   job_rates          the token bucket of a job with max_per_second;
--   concurrency_limits the limit of a concurrency key;
--   events             + 'paused' and 'resumed', of a job or (job_id NULL) of a kind.
--
-- Lock order, shared by every function here: the ready table (claims take ROW EXCLUSIVE, pauses
-- SHARE), then kind_flow rows (in kind order), then job, key and job_rates rows (SKIP LOCKED by
-- claims, so they never wait on them).

SET LOCAL lock_timeout = '60s';

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

ALTER TABLE chunkd.jobs
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN max_per_second numeric
        CHECK (max_per_second IS NULL OR (max_per_second > 0 AND max_per_second < 'Infinity')),
    ADD COLUMN concurrency_key text
        CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 200);

-- Jobs under flow control that may still have work: while none of a claimer's kinds exists (and
-- no kind_flow row), claims take the fast path. paused_at, the one mutable column here, changes
-- only on pause and resume.
DROP INDEX chunkd.jobs_limited_active;
CREATE INDEX jobs_flow_active ON chunkd.jobs (priority DESC, created_at)
    WHERE (max_concurrency IS NOT NULL OR max_per_second IS NOT NULL
           OR concurrency_key IS NOT NULL OR paused_at IS NOT NULL)
      AND finished_at IS NULL AND cancelled_at IS NULL;
-- The active jobs of a rate-limited or paused kind (one entry per job, written at enqueue).
CREATE INDEX jobs_active_kind ON chunkd.jobs (kind)
    WHERE finished_at IS NULL AND cancelled_at IS NULL;
-- The active jobs of a concurrency key: their open attempts are the key's slots in use.
CREATE INDEX jobs_active_key ON chunkd.jobs (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND finished_at IS NULL;

-- A token bucket is (tokens, refilled_at): its level now is tokens + per_second * (now() -
-- refilled_at), at most burst. A claim takes whole tokens under the row lock and writes the level
-- back. wake_at is the last "come back at" handed to a throttled claimer: the next one is told a
-- later time, so the daemons of a fleet take turns instead of all waking at once.
CREATE TABLE chunkd.kind_flow (
    kind        text PRIMARY KEY CHECK (length(kind) BETWEEN 1 AND 200),
    paused_at   timestamptz,
    per_second  numeric CHECK (per_second IS NULL OR (per_second > 0 AND per_second < 'Infinity')),
    burst       int CHECK (burst IS NULL OR burst >= 1),
    tokens      float8 NOT NULL DEFAULT 0,
    refilled_at timestamptz NOT NULL DEFAULT now(),
    wake_at     timestamptz,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    -- A row exists only while the kind is under some control.
    CHECK (paused_at IS NOT NULL OR per_second IS NOT NULL),
    CHECK ((per_second IS NULL) = (burst IS NULL))
);

CREATE TABLE chunkd.job_rates (
    job_id      bigint PRIMARY KEY REFERENCES chunkd.jobs (id) ON DELETE CASCADE,
    per_second  float8 NOT NULL CHECK (per_second > 0),
    burst       float8 NOT NULL CHECK (burst >= 1),
    tokens      float8 NOT NULL,
    refilled_at timestamptz NOT NULL DEFAULT now(),
    wake_at     timestamptz
);

CREATE TABLE chunkd.concurrency_limits (
    key             text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 200),
    max_concurrency int NOT NULL CHECK (max_concurrency >= 1),
    changed_at      timestamptz NOT NULL DEFAULT now()
);

-- Pause and resume are audit events of a job (chunk_id NULL) or of a kind (job_id NULL too).
-- worker_id holds the database role that paused or resumed.
ALTER TABLE chunkd.events
    ALTER COLUMN job_id DROP NOT NULL,
    ADD COLUMN kind text,
    DROP CONSTRAINT events_event_check,
    ADD CONSTRAINT events_event_check
        CHECK (event IN ('cancelled', 'retried', 'job_finished', 'paused', 'resumed')),
    ADD CONSTRAINT events_subject CHECK (job_id IS NOT NULL OR kind IS NOT NULL);

-- ---------------------------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------------------------

-- A bucket's level at a moment, at most burst. Claims use one clock reading taken after their
-- locks and their snapshot: it is also their attempts' claimed_at, so the audit trail shows
-- exactly what the buckets and the slot counts saw.
CREATE FUNCTION chunkd.bucket_level(tokens float8, refilled_at timestamptz, per_second float8,
                                    burst float8, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN least(burst, tokens + per_second
                     * greatest(0, extract(epoch FROM at - refilled_at)::float8));

-- When a throttled claimer should come back: once the bucket holds a quantum (half its burst,
-- at least one token), and not before one quantum after the turn handed out last, so that
-- claimers are spread over the refill instead of all waking at the same instant. A claim every
-- half burst leaves room for a late one before the bucket overflows.
CREATE FUNCTION chunkd.bucket_turn(level float8, wake_at timestamptz, per_second float8,
                                   burst float8, at timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN greatest(
    at + chunkd.seconds(greatest(0, greatest(1, burst / 2) - level) / per_second),
    coalesce(wake_at, '-infinity') + chunkd.seconds(greatest(1, burst / 2) / per_second));

-- The burst when none is given: a third of a second of the rate, at least one chunk. Any window
-- of T seconds sees at most burst + per_second * T claims: at 20/s, 107 in 5 s (+7 %).
CREATE FUNCTION chunkd.default_burst(per_second numeric) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN greatest(1, ceil(per_second / 3))::int;

-- The kind and concurrency-key names the flow functions accept (as create_sync_job's kind).
CREATE FUNCTION chunkd.check_name(what text, name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL OR length(name) = 0 OR length(name) > 200 THEN
        RAISE EXCEPTION 'chunkd: % must be a non-empty text of at most 200 characters', what
            USING ERRCODE = '22023';
    END IF;
    RETURN name;
END;
$$;

CREATE FUNCTION chunkd.check_rate(what text, per_second numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF per_second IS NOT NULL AND NOT (per_second > 0 AND per_second < 'Infinity') THEN
        RAISE EXCEPTION
            'chunkd: % must be NULL (no limit) or a positive number of chunks per second, got %',
            what, per_second USING ERRCODE = '22023';
    END IF;
    RETURN per_second;
END;
$$;

-- Requeued chunks keep their job's flow settings (they are immutable; pause is read by the
-- claim, never copied into queue rows).
CREATE OR REPLACE FUNCTION chunkd.requeue(chunk_ids bigint[], claims int[], attempts int[],
                                          run_in_s float8[])
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH input AS (
        SELECT i.chunk_id, i.claims, i.attempt, i.run_in_s, c.job_id, c.seq, j.priority, j.kind,
               (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
                OR j.concurrency_key IS NOT NULL) AS limited
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

-- ---------------------------------------------------------------------------------------------
-- Enqueue
-- ---------------------------------------------------------------------------------------------

-- create_sync_job (and create_sync_jobs, through create_jobs) take max_per_second and
-- concurrency_key. job_specs' table is the list of keys a job object may have, so it and the
-- two functions whose bodies read it are created again; create_jobs is replaced in place.
DROP FUNCTION chunkd.invalid_job_spec(jsonb);
DROP FUNCTION chunkd.misshapen_job_specs(jsonb);
DROP FUNCTION chunkd.job_specs(jsonb);

CREATE FUNCTION chunkd.job_specs(jobs jsonb)
RETURNS TABLE (
    ord int,
    kind text,
    chunks jsonb,
    payload jsonb,
    max_concurrency int,
    max_attempts int,
    priority int,
    run_at timestamptz,
    dedupe_key text,
    open boolean,
    on_finish_kind text,
    max_per_second numeric,
    concurrency_key text
)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT e.ord::int, x.kind, x.chunks,
           coalesce(nullif(x.payload, 'null'::jsonb), '{}'::jsonb),
           x.max_concurrency,
           CASE WHEN e.spec ? 'max_attempts' THEN x.max_attempts ELSE 3 END,
           coalesce(x.priority, 0),
           x.run_at,
           x.dedupe_key,
           coalesce(x.open, false),
           x.on_finish_kind,
           x.max_per_second,
           x.concurrency_key
    FROM jsonb_array_elements(job_specs.jobs) WITH ORDINALITY AS e(spec, ord)
    CROSS JOIN LATERAL jsonb_to_record(e.spec) AS x(
        kind text, chunks jsonb, payload jsonb, max_concurrency int, max_attempts int,
        priority int, run_at timestamptz, dedupe_key text, open boolean, on_finish_kind text,
        max_per_second numeric, concurrency_key text);
END;

CREATE FUNCTION chunkd.misshapen_job_specs(jobs jsonb)
RETURNS TABLE (ord int, problem text)
LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH known AS (
        SELECT array_agg(a.name ORDER BY a.i) AS keys
        FROM pg_catalog.pg_proc p
        CROSS JOIN LATERAL unnest(p.proargnames, p.proargmodes) WITH ORDINALITY AS a(name, mode, i)
        WHERE p.oid = 'chunkd.job_specs(jsonb)'::regprocedure AND a.mode = 't'
          AND a.name <> 'ord'
    )
    SELECT s.ord, s.problem
    FROM (
        SELECT e.ord::int AS ord,
               CASE WHEN jsonb_typeof(e.spec) <> 'object'
                    THEN format('must be a JSON object, got %s', jsonb_typeof(e.spec))
                    ELSE (SELECT format('unknown key %s (keys: %s)', to_jsonb(k),
                                        array_to_string(known.keys, ', '))
                          FROM jsonb_object_keys(e.spec) k
                          WHERE NOT k = ANY (known.keys) ORDER BY k LIMIT 1)
               END AS problem
        FROM jsonb_array_elements(misshapen_job_specs.jobs) WITH ORDINALITY AS e(spec, ord),
             known
    ) s
    WHERE s.problem IS NOT NULL
    ORDER BY s.ord
    LIMIT 1;
END;

CREATE FUNCTION chunkd.invalid_job_spec(jobs jsonb) RETURNS TABLE (ord int)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT s.ord
    FROM chunkd.job_specs(invalid_job_spec.jobs) s
    WHERE (s.kind IS NOT NULL AND length(s.kind) BETWEEN 1 AND 200
           AND CASE WHEN jsonb_typeof(s.chunks) = 'array'
                    THEN jsonb_array_length(s.chunks)
                         BETWEEN CASE WHEN s.open THEN 0 ELSE 1 END AND 1000000
                         AND pg_column_size(s.chunks) <= 16 * 1024 * 1024
                    ELSE false END
           AND pg_column_size(s.payload) <= 1024 * 1024
           AND (s.max_concurrency IS NULL OR s.max_concurrency >= 1)
           AND s.max_attempts >= 1
           AND (s.run_at IS NULL OR isfinite(s.run_at))
           AND (s.dedupe_key IS NULL OR length(s.dedupe_key) BETWEEN 1 AND 256)
           AND (s.on_finish_kind IS NULL OR length(s.on_finish_kind) BETWEEN 1 AND 200)
           AND (s.max_per_second IS NULL
                OR (s.max_per_second > 0 AND s.max_per_second < 'Infinity'))
           AND (s.concurrency_key IS NULL OR length(s.concurrency_key) BETWEEN 1 AND 200)
          ) IS NOT TRUE
    ORDER BY s.ord
    LIMIT 1;
END;

-- As in version 5, plus max_per_second (a job's token bucket, created full) and
-- concurrency_key; a job under any of these limits is claimed by the slow path (`limited`).
CREATE OR REPLACE FUNCTION chunkd.create_jobs(jobs jsonb, single boolean DEFAULT false)
RETURNS TABLE (ord int, sync_job_id uuid, created boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The planner cannot know how many jobs and chunks a call brings, and its guesses for the
-- functions that unpack them pass jit_above_cost: compiling the insert took 25 ms of a
-- one-chunk call (measured), more than the insert itself.
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    p_jobs jsonb := create_jobs.jobs;
    p_single boolean := coalesce(create_jobs.single, false);
    n int;
    bad_ord int;
    bad record;
    where_ text;
    pending boolean[];  -- by position: still without a job; NULL: all of them
    left_ int;
    made_ords int[] := '{}';
    made_ids uuid[] := '{}';
    found_ords int[] := '{}';
    found_ids uuid[] := '{}';
    new_ords int[];
    new_ids uuid[];
    o int;
    tries int := 0;
BEGIN
    IF p_jobs IS NULL OR jsonb_typeof(p_jobs) <> 'array' THEN
        RAISE EXCEPTION 'chunkd: jobs must be a JSON array of job objects, got %',
            coalesce(jsonb_typeof(p_jobs), 'null') USING ERRCODE = '22023';
    END IF;
    n := jsonb_array_length(p_jobs);
    IF n = 0 THEN
        RETURN;
    END IF;

    IF p_single THEN
        SELECT v.ord INTO bad_ord FROM chunkd.invalid_job_spec(p_jobs) v;
    ELSE
        SELECT m.ord, m.problem INTO bad FROM chunkd.misshapen_job_specs(p_jobs) m;
        IF FOUND THEN
            RAISE EXCEPTION 'chunkd: jobs[%]: %', bad.ord - 1, bad.problem
                USING ERRCODE = '22023';
        END IF;
        BEGIN
            SELECT v.ord INTO bad_ord FROM chunkd.invalid_job_spec(p_jobs) v;
        EXCEPTION WHEN data_exception THEN
            -- A value that does not convert ("run_at": "next week"): find which, say so.
            FOR bad IN
                SELECT e.ord::int AS ord, e.spec
                FROM jsonb_array_elements(p_jobs) WITH ORDINALITY AS e(spec, ord)
                ORDER BY e.ord
            LOOP
                where_ := chunkd.job_spec_problem(bad.spec);
                IF where_ IS NOT NULL THEN
                    RAISE EXCEPTION 'chunkd: jobs[%].%', bad.ord - 1, where_
                        USING ERRCODE = '22023';
                END IF;
            END LOOP;
            RAISE;
        END;
    END IF;
    IF bad_ord IS NOT NULL THEN
        SELECT s.* INTO bad FROM chunkd.job_specs(p_jobs) s WHERE s.ord = bad_ord;
        where_ := CASE WHEN p_single THEN '' ELSE format('jobs[%s]: ', bad_ord - 1) END;
        IF bad.kind IS NULL OR length(bad.kind) = 0 OR length(bad.kind) > 200 THEN
            RAISE EXCEPTION 'chunkd: %kind must be a non-empty text of at most 200 characters',
                where_ USING ERRCODE = '22023';
        ELSIF bad.chunks IS NULL OR jsonb_typeof(bad.chunks) <> 'array' THEN
            RAISE EXCEPTION 'chunkd: %chunks must be a JSON array of chunk payloads, got %',
                where_, coalesce(jsonb_typeof(bad.chunks), 'null') USING ERRCODE = '22023';
        ELSIF jsonb_array_length(bad.chunks) = 0 AND NOT bad.open THEN
            RAISE EXCEPTION 'chunkd: %chunks must not be empty', where_ USING ERRCODE = '22023';
        ELSIF bad.max_concurrency < 1 THEN
            RAISE EXCEPTION 'chunkd: %max_concurrency must be NULL (unlimited) or >= 1, got %',
                where_, bad.max_concurrency USING ERRCODE = '22023';
        ELSIF bad.max_attempts IS NULL OR bad.max_attempts < 1 THEN
            RAISE EXCEPTION 'chunkd: %max_attempts must be >= 1, got %', where_,
                bad.max_attempts USING ERRCODE = '22023';
        ELSIF NOT isfinite(bad.run_at) THEN
            RAISE EXCEPTION 'chunkd: %run_at must be a finite timestamp (NULL: at once), got %',
                where_, bad.run_at USING ERRCODE = '22023';
        ELSIF length(bad.dedupe_key) = 0 THEN
            RAISE EXCEPTION 'chunkd: %dedupe_key must not be empty (NULL: no key)', where_
                USING ERRCODE = '22023';
        ELSIF length(bad.dedupe_key) > 256 THEN
            RAISE EXCEPTION 'chunkd: %dedupe_key must be at most 256 characters, got %',
                where_, length(bad.dedupe_key) USING ERRCODE = '22023';
        ELSIF length(bad.on_finish_kind) = 0 OR length(bad.on_finish_kind) > 200 THEN
            RAISE EXCEPTION 'chunkd: %on_finish_kind must be NULL or a non-empty text of at '
                'most 200 characters', where_ USING ERRCODE = '22023';
        ELSIF NOT (bad.max_per_second > 0 AND bad.max_per_second < 'Infinity') THEN
            RAISE EXCEPTION 'chunkd: %max_per_second must be NULL (no limit) or a positive '
                'number of chunks per second, got %', where_, bad.max_per_second
                USING ERRCODE = '22023';
        ELSIF length(bad.concurrency_key) = 0 OR length(bad.concurrency_key) > 200 THEN
            RAISE EXCEPTION 'chunkd: %concurrency_key must be a non-empty text of at most 200 '
                'characters', where_ USING ERRCODE = '22023';
        -- Documented limits: a queue is not a blob store, and one huge job must not bloat the
        -- tables every claim reads. (Sizes as stored, i.e. after jsonb encoding.)
        ELSIF pg_column_size(bad.chunks) > 16 * 1024 * 1024 THEN
            RAISE EXCEPTION 'chunkd: %chunks are % bytes, above the limit of 16 MiB per job',
                where_, pg_column_size(bad.chunks) USING ERRCODE = '54000';
        ELSIF pg_column_size(bad.payload) > 1024 * 1024 THEN
            RAISE EXCEPTION 'chunkd: %job payload is % bytes, above the limit of 1 MiB',
                where_, pg_column_size(bad.payload) USING ERRCODE = '54000';
        ELSE
            RAISE EXCEPTION 'chunkd: %', format('%s%s chunks in one job, above the limit of '
                '1,000,000', where_, jsonb_array_length(bad.chunks)) USING ERRCODE = '54000';
        END IF;
    END IF;

    left_ := n;
    LOOP
        tries := tries + 1;
        -- Jobs, chunks and their queue rows in one statement: one NOTIFY for all of them.
        -- Rows with a dedupe key are inserted in key order, so two batches racing on the same
        -- keys wait for each other instead of deadlocking.
        WITH input AS MATERIALIZED (
            SELECT s.*, gen_random_uuid() AS public_id
            FROM chunkd.job_specs(p_jobs) s
            WHERE pending IS NULL OR pending[s.ord]
        ), ins AS (
            INSERT INTO chunkd.jobs AS j (public_id, kind, payload, max_concurrency,
                                          max_attempts, priority, total_chunks, run_at,
                                          dedupe_key, open, on_finish_kind, max_per_second,
                                          concurrency_key)
            SELECT i.public_id, i.kind, i.payload, i.max_concurrency, i.max_attempts,
                   i.priority, jsonb_array_length(i.chunks), i.run_at, i.dedupe_key, i.open,
                   i.on_finish_kind, i.max_per_second, i.concurrency_key
            FROM input i
            ORDER BY i.dedupe_key IS NULL, i.kind, i.dedupe_key, i.ord
            ON CONFLICT (kind, dedupe_key)
                WHERE dedupe_key IS NOT NULL AND finished_at IS NULL AND cancelled_at IS NULL
                DO NOTHING
            RETURNING j.id, j.public_id, j.kind, j.priority, j.max_per_second,
                      (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
                       OR j.concurrency_key IS NOT NULL) AS limited,
                      coalesce(j.run_at > now(), false) AS later, j.run_at
        ), made AS (
            SELECT ins.*, i.ord, i.chunks FROM ins JOIN input i ON i.public_id = ins.public_id
        ), rates AS (
            -- A job's own rate limit: its token bucket starts full (one burst).
            INSERT INTO chunkd.job_rates (job_id, per_second, burst, tokens)
            SELECT m.id, m.max_per_second, chunkd.default_burst(m.max_per_second),
                   chunkd.default_burst(m.max_per_second)
            FROM made m WHERE m.max_per_second IS NOT NULL
        ), c AS (
            INSERT INTO chunkd.chunks (job_id, seq, payload)
            SELECT m.id, (e.ordinality - 1)::int, e.value
            FROM made m
            CROSS JOIN LATERAL jsonb_array_elements(m.chunks) WITH ORDINALITY AS e(value, ordinality)
            RETURNING chunks.id, chunks.job_id, chunks.seq
        ), now_due AS (
            INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited)
            SELECT c.id, c.job_id, c.seq, m.priority, m.kind, m.limited
            FROM c JOIN made m ON m.id = c.job_id
            WHERE NOT m.later
        ), due_later AS (
            INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims,
                                          attempt, run_at)
            SELECT c.id, c.job_id, c.seq, m.priority, m.kind, m.limited, 0, 0, m.run_at
            FROM c JOIN made m ON m.id = c.job_id
            WHERE m.later
        )
        SELECT coalesce(array_agg(m.ord), '{}'), coalesce(array_agg(m.public_id), '{}')
        INTO new_ords, new_ids
        FROM made m;
        made_ords := made_ords || new_ords;
        made_ids := made_ids || new_ids;
        left_ := left_ - cardinality(new_ords);
        EXIT WHEN left_ = 0;
        IF pending IS NULL THEN
            pending := array_fill(true, ARRAY[n]);
        END IF;
        FOREACH o IN ARRAY new_ords LOOP
            pending[o] := false;
        END LOOP;

        -- The others met an unfinished job of the same kind and key (committed, or inserted
        -- by this call): return it. One that finished in between frees its key: try again.
        SELECT coalesce(array_agg(s.ord), '{}'), coalesce(array_agg(j.public_id), '{}')
        INTO new_ords, new_ids
        FROM chunkd.job_specs(p_jobs) s
        JOIN chunkd.jobs j ON j.kind = s.kind AND j.dedupe_key = s.dedupe_key
                          AND j.finished_at IS NULL AND j.cancelled_at IS NULL
        WHERE pending[s.ord];
        found_ords := found_ords || new_ords;
        found_ids := found_ids || new_ids;
        left_ := left_ - cardinality(new_ords);
        EXIT WHEN left_ = 0;
        FOREACH o IN ARRAY new_ords LOOP
            pending[o] := false;
        END LOOP;
        IF tries >= 10 THEN
            RAISE EXCEPTION 'chunkd: the jobs with these dedupe keys kept finishing while this '
                'call ran; try again' USING ERRCODE = '40001';
        END IF;
    END LOOP;

    IF cardinality(found_ords) = 0 THEN
        RETURN QUERY SELECT m.o, m.id, true FROM unnest(made_ords, made_ids) AS m(o, id)
                     ORDER BY m.o;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT r.o, r.id, r.made
    FROM (
        SELECT m.o, m.id, true AS made FROM unnest(made_ords, made_ids) AS m(o, id)
        UNION ALL
        SELECT f.o, f.id, false FROM unnest(found_ords, found_ids) AS f(o, id)
    ) r
    ORDER BY r.o;
END;
$$;

-- The public enqueue: version 5's arguments, then max_per_second and concurrency_key.
CREATE FUNCTION chunkd.create_sync_job(
    kind text,
    chunks jsonb,
    payload jsonb DEFAULT '{}',
    max_concurrency int DEFAULT NULL,
    max_attempts int DEFAULT 3,
    priority int DEFAULT 0,
    run_at timestamptz DEFAULT NULL,
    dedupe_key text DEFAULT NULL,
    open boolean DEFAULT false,
    on_finish_kind text DEFAULT NULL,
    max_per_second numeric DEFAULT NULL,
    concurrency_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT j.sync_job_id
    FROM chunkd.create_jobs(
        jsonb_build_array(jsonb_build_object(
            'kind', create_sync_job.kind,
            'chunks', create_sync_job.chunks,
            'payload', create_sync_job.payload,
            'max_concurrency', create_sync_job.max_concurrency,
            'max_attempts', create_sync_job.max_attempts,
            'priority', create_sync_job.priority,
            'run_at', create_sync_job.run_at,
            'dedupe_key', create_sync_job.dedupe_key,
            'open', create_sync_job.open,
            'on_finish_kind', create_sync_job.on_finish_kind,
            'max_per_second', create_sync_job.max_per_second,
            'concurrency_key', create_sync_job.concurrency_key)),
        true) j;
END;

SELECT chunkd.carry_grants(
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text)',
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text, '
    'numeric, text)');
DROP FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text,
                                     boolean, text);

-- Chunks appended to a job (continuations, open jobs) are limited like the job's others.
CREATE OR REPLACE FUNCTION chunkd.add_chunks(job bigint, chunks jsonb, continued boolean) RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    j record;
    n int := jsonb_array_length(chunks);
BEGIN
    SELECT x.total_chunks, x.kind, x.priority,
           (x.max_concurrency IS NOT NULL OR x.max_per_second IS NOT NULL
            OR x.concurrency_key IS NOT NULL) AS limited
    INTO j
    FROM chunkd.jobs x WHERE x.id = job FOR NO KEY UPDATE;
    IF j.total_chunks + n > 1000000 THEN
        RAISE EXCEPTION 'chunkd: appending % chunks would make % in one job, above the limit '
            'of 1,000,000', n, j.total_chunks + n USING ERRCODE = '54000';
    END IF;
    WITH c AS (
        INSERT INTO chunkd.chunks (job_id, seq, payload)
        SELECT job, j.total_chunks + (e.ordinality - 1)::int, e.value
        FROM jsonb_array_elements(chunks) WITH ORDINALITY AS e(value, ordinality)
        RETURNING chunks.id, chunks.seq
    )
    INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited)
    SELECT c.id, job, c.seq, j.priority, j.kind, j.limited FROM c;
    UPDATE chunkd.jobs x
    SET total_chunks = x.total_chunks + n,
        appended_chunks = x.appended_chunks + CASE WHEN continued THEN n ELSE 0 END
    WHERE x.id = job;
    RETURN n;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Claim
-- ---------------------------------------------------------------------------------------------

-- Is flow control in use for these kinds (NULL: all kinds)? Any unfinished job of them paused,
-- rate-limited, keyed or concurrency-limited (an empty partial index while nobody uses flow
-- control), or any of them paused or rate-limited (an empty table). plpgsql, so its plan is
-- cached for the session; STABLE, so called inside a statement it reads that statement's
-- snapshot.
CREATE FUNCTION chunkd.flow_in_use(kinds text[]) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (
               SELECT 1 FROM chunkd.jobs j
               WHERE (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
                      OR j.concurrency_key IS NOT NULL OR j.paused_at IS NOT NULL)
                 AND j.finished_at IS NULL AND j.cancelled_at IS NULL
                 -- A delayed job has no ready chunk before its run_at (version 5).
                 AND (j.run_at IS NULL OR j.run_at <= now())
                 AND (flow_in_use.kinds IS NULL OR j.kind = ANY (flow_in_use.kinds)))
           OR EXISTS (
               SELECT 1 FROM chunkd.kind_flow k
               WHERE flow_in_use.kinds IS NULL OR k.kind = ANY (flow_in_use.kinds));
END;
$$;

-- The daemon's claim. Claimed chunks as claim_chunks returns them (wait_s NULL); and when the
-- claim came back short because a rate limit held chunks back, one more row with id NULL whose
-- wait_s says when to come back (seconds, database clock): the claimer sleeps until then
-- instead of polling. waiting_s: how long until the claimer comes back anyway (a turn it was
-- given before and still holds); then it is given no new turn, so claims made between turns
-- (woken by a NOTIFY) do not push every other claimer's turn back.
--
-- Fast path, as in schema version 2: one statement, taken while flow control is not in use for
-- these kinds. That check (flow_in_use) sits inside the statement as a one-time filter, so it
-- reads the same snapshot as the rows it claims: a pause (which takes SHARE on `ready`,
-- conflicting with this statement's ROW EXCLUSIVE) is either seen, or waits for this claim to
-- commit. A function rather than subqueries, so that planning the statement costs what it did.
CREATE FUNCTION chunkd.claim_or_wait(
    worker_id text,
    batch_size int,
    kinds text[],
    lease_s float8,
    waiting_s float8 DEFAULT NULL
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
    lease_expires_at timestamptz,
    wait_s float8
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_worker text := claim_or_wait.worker_id;
    p_batch int := claim_or_wait.batch_size;
    p_kinds text[] := claim_or_wait.kinds;
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

    RETURN QUERY
    WITH del AS (
        -- ctid is safe here: ready rows are never updated, and the lock is held until DELETE.
        DELETE FROM chunkd.ready r
        WHERE r.ctid = ANY (ARRAY(
            SELECT q.ctid FROM chunkd.ready q
            WHERE NOT q.limited AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
              AND NOT chunkd.flow_in_use(p_kinds)
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
           c.payload, j.payload, p_until, NULL::float8
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.seq;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Nothing claimed: an empty queue, or flow control in use for these kinds.
    IF NOT chunkd.flow_in_use(p_kinds) THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM chunkd.claim_flow(p_worker, p_batch, p_kinds, p_until, waiting_s);
END;
$$;

-- The slow path, taken while flow control is in use for the claimer's kinds.
--
-- Which chunks may run now, by the limits that apply to each:
--   a job's max_concurrency: the first (max_concurrency - in flight) of its pending chunks in seq
--     order, only those already due (as in schema version 2: a waiting retry keeps its place);
--   a job's max_per_second: as many as its bucket holds whole tokens;
--   a concurrency key: (limit - in flight over all its unfinished jobs) chunks, in the order
--     below, so the key's jobs take turns (every job's chunk 0, then every job's chunk 1, ...);
--   a kind's rate: as many as its bucket holds whole tokens;
--   paused jobs and kinds: none.
-- Then all that remains, and the unlimited chunks of other kinds, are taken by priority and seq
-- (fair across jobs), up to the batch. Each limit is applied to what passed the ones before, so
-- a chunk held back late can leave an earlier limit under-used for this one claim; never over.
--
-- The work is bounded by the batch, not by how many jobs are under flow control: a first, cheap
-- pass (one index probe per job, no locks) orders the jobs that may have something to run now
-- by priority and their next chunk's seq, keeps no more per key or per kind than that key or
-- kind has room for, and keeps the first batch_size; only those are locked and expanded.
--
-- Every limit is checked under the lock of its row, counted in a statement that starts after the
-- lock was taken: concurrent claimers on any number of hosts never exceed one. Job, key and job
-- bucket rows are locked SKIP LOCKED (never wait on another claimer: its NOTIFY, turn or our
-- poll brings us back); kind buckets are waited for, in kind order, so that claimers of one
-- limited kind take turns on its bucket and each learns when the next tokens are due.
CREATE FUNCTION chunkd.claim_flow(
    p_worker text,
    p_batch int,
    p_kinds text[],
    p_until timestamptz,
    p_waiting_s float8
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
    lease_expires_at timestamptz,
    wait_s float8
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rl_kinds text[] := '{}';        -- rate-limited kinds of this claim, locked
    rl_levels float8[] := '{}';     -- their buckets' levels at p_now
    pool_ids bigint[] := '{}';      -- unfinished jobs under flow control of these kinds
    cand_ids bigint[] := '{}';      -- the jobs this claim looks at (first pass)
    room_keys text[] := '{}';       -- the room the first pass saw per key and per kind: the
    room_key_n bigint[] := '{}';    -- pick takes no more (a slot freed meanwhile is claimed
    room_kinds text[] := '{}';      -- on its NOTIFY), so a key's or a kind's jobs take turns
    room_kind_n bigint[] := '{}';   -- even when more room appeared
    mc_ids bigint[] := '{}';        -- of those, the max_concurrency jobs, locked
    key_names text[] := '{}';       -- their concurrency keys with a limit, locked
    jr_ids bigint[] := '{}';        -- their jobs with their own rate, buckets locked
    jr_levels float8[] := '{}';
    free_kinds text[];              -- these kinds without a pause or a rate (NULL: all such)
    picked bigint[];
    cut_kinds text[];
    cut_jobs bigint[];
    p_now timestamptz;              -- the claim's clock: see the pick below
    n_claimed int;
    turn record;
BEGIN
    -- The lock order every pause and claim follows: the ready table first (a pause takes SHARE
    -- and waits for claims under way; claims started later see the pause).
    LOCK TABLE chunkd.ready IN ROW EXCLUSIVE MODE;

    SELECT coalesce(array_agg(b.kind ORDER BY b.kind), '{}') INTO rl_kinds
    FROM (
        SELECT k.kind
        FROM chunkd.kind_flow k
        WHERE k.per_second IS NOT NULL AND k.paused_at IS NULL
          AND (p_kinds IS NULL OR k.kind = ANY (p_kinds))
        ORDER BY k.kind
        FOR NO KEY UPDATE OF k
    ) b;

    -- The claimer's kinds that are neither paused nor rate-limited: their unlimited chunks are
    -- claimed as on the fast path (none at all when there are none, without scanning).
    IF p_kinds IS NOT NULL THEN
        free_kinds := ARRAY(SELECT x FROM unnest(p_kinds) x
                            WHERE NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k WHERE k.kind = x));
    END IF;

    -- The jobs that go through this path: under flow control themselves (jobs_flow_active), or of
    -- a rate-limited kind (jobs_active_kind).
    pool_ids := ARRAY(
        SELECT j.id FROM chunkd.jobs j
        WHERE (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
               OR j.concurrency_key IS NOT NULL OR j.paused_at IS NOT NULL)
          AND j.finished_at IS NULL AND j.cancelled_at IS NULL
          AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
        UNION
        SELECT j.id FROM chunkd.jobs j
        WHERE j.kind = ANY (rl_kinds) AND j.finished_at IS NULL AND j.cancelled_at IS NULL);

    -- First pass, without locks: the jobs that may have a chunk to run now, by what they would
    -- give first. Capacities read here are rechecked under the locks below.
    WITH jobs_in AS (
        SELECT j.id, j.kind, j.priority, j.created_at, j.concurrency_key, j.max_concurrency,
               j.max_per_second
        FROM chunkd.jobs j
        WHERE j.id = ANY (pool_ids) AND j.paused_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
          AND (j.kind = ANY (rl_kinds) OR NOT EXISTS (
                  SELECT 1 FROM chunkd.kind_flow k
                  WHERE k.kind = j.kind AND k.per_second IS NOT NULL))
    ), nexts AS (
        SELECT i.*, n.first_seq
        FROM jobs_in i
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN i.max_concurrency IS NULL THEN
                    (SELECT r.seq FROM chunkd.ready r WHERE r.job_id = i.id ORDER BY r.seq LIMIT 1)
                ELSE (
                    SELECT min(x.seq) FILTER (WHERE x.due)
                    FROM (
                        SELECT y.seq, y.due FROM (
                            SELECT r.seq, true AS due FROM chunkd.ready r WHERE r.job_id = i.id
                            UNION ALL
                            SELECT s.seq, false FROM chunkd.scheduled s WHERE s.job_id = i.id
                        ) y
                        ORDER BY y.seq
                        LIMIT greatest(0, i.max_concurrency - (
                            SELECT count(*) FROM chunkd.attempts a
                            WHERE a.job_id = i.id AND a.limited AND a.ended_at IS NULL))
                    ) x)
            END AS first_seq
        ) n
        WHERE n.first_seq IS NOT NULL
          AND (i.max_per_second IS NULL OR EXISTS (
                  SELECT 1 FROM chunkd.job_rates jr
                  WHERE jr.job_id = i.id
                    AND chunkd.bucket_level(jr.tokens, jr.refilled_at, jr.per_second, jr.burst,
                                            clock_timestamp()) >= 1))
    ), key_room AS (
        SELECT l.key, l.max_concurrency - (
            SELECT count(*) FROM chunkd.jobs kj
            JOIN chunkd.attempts a ON a.job_id = kj.id AND a.limited AND a.ended_at IS NULL
            WHERE kj.concurrency_key = l.key AND kj.finished_at IS NULL) AS room
        FROM chunkd.concurrency_limits l
        WHERE l.key IN (SELECT n.concurrency_key FROM nexts n)
    ), kind_room AS (
        SELECT k.kind,
               floor(chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp()))::bigint AS room
        FROM chunkd.kind_flow k
        WHERE k.kind = ANY (rl_kinds)
    ), ranked AS (
        SELECT n.id, n.priority, n.first_seq, n.created_at, kr.room AS key_room,
               row_number() OVER (PARTITION BY n.concurrency_key
                                  ORDER BY n.priority DESC, n.first_seq, n.created_at, n.id)
                   AS n_key,
               kd.room AS kind_room,
               row_number() OVER (PARTITION BY n.kind
                                  ORDER BY n.priority DESC, n.first_seq, n.created_at, n.id)
                   AS n_kind
        FROM nexts n
        LEFT JOIN key_room kr ON kr.key = n.concurrency_key
        LEFT JOIN kind_room kd ON kd.kind = n.kind
    )
    SELECT coalesce((SELECT array_agg(c.id) FROM (
                         SELECT r.id FROM ranked r
                         WHERE (r.key_room IS NULL OR r.n_key <= r.key_room)
                           AND (r.kind_room IS NULL OR r.n_kind <= r.kind_room)
                         ORDER BY r.priority DESC, r.first_seq, r.created_at
                         LIMIT p_batch) c), '{}'),
           coalesce((SELECT array_agg(k.key) FROM key_room k), '{}'),
           coalesce((SELECT array_agg(k.room) FROM key_room k), '{}'),
           coalesce((SELECT array_agg(k.kind) FROM kind_room k), '{}'),
           coalesce((SELECT array_agg(k.room) FROM kind_room k), '{}')
    INTO cand_ids, room_keys, room_key_n, room_kinds, room_kind_n;

    -- Locks, on the chosen jobs only.
    SELECT coalesce(array_agg(j.id), '{}') INTO mc_ids
    FROM (
        SELECT j.id FROM chunkd.jobs j
        WHERE j.id = ANY (cand_ids) AND j.max_concurrency IS NOT NULL
        ORDER BY j.id
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) j;

    SELECT coalesce(array_agg(l.key), '{}') INTO key_names
    FROM (
        SELECT c.key FROM chunkd.concurrency_limits c
        WHERE c.key IN (SELECT j.concurrency_key FROM chunkd.jobs j WHERE j.id = ANY (cand_ids))
        ORDER BY c.key
        FOR NO KEY UPDATE OF c SKIP LOCKED
    ) l;

    SELECT coalesce(array_agg(r.job_id ORDER BY r.job_id), '{}') INTO jr_ids
    FROM (
        SELECT r.job_id FROM chunkd.job_rates r
        WHERE r.job_id = ANY (cand_ids)
        ORDER BY r.job_id
        FOR NO KEY UPDATE OF r SKIP LOCKED
    ) r;

    -- What may run now (see above), and which buckets held chunks back. The clock is read once,
    -- after this statement's snapshot: a slot freed by a completion this claim counts on was
    -- freed before it, and every bucket is refilled up to it.
    WITH clock AS MATERIALIZED (
        SELECT clock_timestamp() AS at
    ), kind_level AS (
        SELECT k.kind,
               chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                   c.at) AS level
        FROM chunkd.kind_flow k, clock c
        WHERE k.kind = ANY (rl_kinds)
    ), job_level AS (
        SELECT r.job_id,
               chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst, c.at) AS level
        FROM chunkd.job_rates r, clock c
        WHERE r.job_id = ANY (jr_ids)
    ), cand AS (
        SELECT j.id, j.kind, j.priority, j.created_at, j.max_concurrency, j.concurrency_key,
               floor(jr.level)::int AS rate_cap
        FROM chunkd.jobs j
        LEFT JOIN job_level jr ON jr.job_id = j.id
        WHERE j.id = ANY (cand_ids)
          AND j.paused_at IS NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
          AND (j.max_concurrency IS NULL OR j.id = ANY (mc_ids))
          AND (j.max_per_second IS NULL OR jr.job_id IS NOT NULL)
          AND (j.concurrency_key IS NULL OR j.concurrency_key = ANY (key_names)
               OR NOT EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                              WHERE l.key = j.concurrency_key))
          -- a job of a rate-limited kind only with that kind's bucket in hand
          AND (j.kind = ANY (rl_kinds) OR NOT EXISTS (
                  SELECT 1 FROM chunkd.kind_flow k
                  WHERE k.kind = j.kind AND k.per_second IS NOT NULL))
    ), win AS (
        SELECT c.id AS job_id, c.kind, c.priority, c.created_at, c.concurrency_key, c.rate_cap,
               w.chunk_id, w.seq
        FROM cand c
        CROSS JOIN LATERAL (
            SELECT y.chunk_id, y.seq, y.due FROM (
                SELECT r.chunk_id, r.seq, true AS due FROM chunkd.ready r WHERE r.job_id = c.id
                UNION ALL
                SELECT s.chunk_id, s.seq, false FROM chunkd.scheduled s
                WHERE s.job_id = c.id AND c.max_concurrency IS NOT NULL
            ) y
            ORDER BY y.seq
            LIMIT CASE
                -- one beyond the job's tokens: whether its bucket held chunks back
                WHEN c.max_concurrency IS NULL
                THEN least(p_batch, coalesce(c.rate_cap + 1, p_batch))
                ELSE greatest(0, least(p_batch, c.max_concurrency - (
                    SELECT count(*) FROM chunkd.attempts a
                    WHERE a.job_id = c.id AND a.limited AND a.ended_at IS NULL)))
            END
        ) w
        WHERE w.due
    ), by_job AS (
        SELECT w.*, row_number() OVER (PARTITION BY w.job_id ORDER BY w.seq) AS n_job
        FROM win w
    ), key_free AS (
        SELECT l.key, least(fp.room, l.max_concurrency - (
            SELECT count(*) FROM chunkd.jobs kj
            JOIN chunkd.attempts a ON a.job_id = kj.id AND a.limited AND a.ended_at IS NULL
            WHERE kj.concurrency_key = l.key AND kj.finished_at IS NULL)) AS free
        FROM chunkd.concurrency_limits l
        LEFT JOIN unnest(room_keys, room_key_n) AS fp(key, room) ON fp.key = l.key
        WHERE l.key = ANY (key_names)
    ), by_key AS (
        SELECT x.*, row_number() OVER (PARTITION BY x.concurrency_key
                                       ORDER BY x.priority DESC, x.seq, x.created_at,
                                                x.job_id) AS n_key
        FROM by_job x
        WHERE x.rate_cap IS NULL OR x.n_job <= x.rate_cap
    ), by_kind AS (
        SELECT x.*, row_number() OVER (PARTITION BY x.kind
                                       ORDER BY x.priority DESC, x.seq, x.created_at,
                                                x.job_id) AS n_kind
        FROM by_key x
        LEFT JOIN key_free f ON f.key = x.concurrency_key
        WHERE f.key IS NULL OR x.n_key <= f.free
    ), kind_cap AS (
        SELECT b.kind, least(fp.room, floor(b.level))::int AS cap
        FROM kind_level b
        LEFT JOIN unnest(room_kinds, room_kind_n) AS fp(kind, room) ON fp.kind = b.kind
    ), lim AS (
        SELECT x.chunk_id, x.priority, x.seq
        FROM by_kind x
        LEFT JOIN kind_cap k ON k.kind = x.kind
        WHERE k.kind IS NULL OR x.n_kind <= k.cap
    ), unl AS (
        SELECT q.chunk_id, q.priority, q.seq
        FROM chunkd.ready q
        WHERE NOT q.limited
          AND (p_kinds IS NULL OR cardinality(free_kinds) > 0)
          AND (free_kinds IS NULL OR q.kind = ANY (free_kinds))
          AND q.kind <> ALL (ARRAY(SELECT k.kind FROM chunkd.kind_flow k))
          AND q.job_id <> ALL (ARRAY(
              SELECT j.id FROM chunkd.jobs j
              WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL
                AND j.cancelled_at IS NULL))
        ORDER BY q.priority DESC, q.seq
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), chosen AS (
        SELECT c.chunk_id
        FROM (SELECT * FROM lim UNION ALL SELECT * FROM unl) c
        ORDER BY c.priority DESC, c.seq
        LIMIT p_batch
    )
    SELECT (SELECT array_agg(c.chunk_id) FROM chosen c),
           (SELECT array_agg(DISTINCT x.kind) FROM by_kind x JOIN kind_cap k ON k.kind = x.kind
            WHERE x.n_kind > k.cap),
           (SELECT array_agg(DISTINCT x.job_id) FROM by_job x WHERE x.n_job > x.rate_cap),
           (SELECT coalesce(array_agg(k.level ORDER BY k.kind), '{}') FROM kind_level k),
           (SELECT coalesce(array_agg(j.level ORDER BY j.job_id), '{}') FROM job_level j),
           (SELECT c.at FROM clock c)
    INTO picked, cut_kinds, cut_jobs, rl_levels, jr_levels, p_now;


    RETURN QUERY
    WITH locked AS (
        SELECT r.ctid FROM chunkd.ready r WHERE r.chunk_id = ANY (picked)
        FOR UPDATE SKIP LOCKED
    ), del AS (
        DELETE FROM chunkd.ready r
        WHERE r.ctid = ANY (ARRAY(SELECT l.ctid FROM locked l))
        RETURNING r.chunk_id, r.job_id, r.seq, r.priority, r.kind, r.claims, r.attempt
    ), ins AS (
        -- limited = counts against a concurrency limit (its end frees a slot: NOTIFY)
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     claimed_at, lease_expires_at)
        SELECT d.chunk_id, d.claims + 1, d.attempt + 1, d.job_id,
               j.max_concurrency IS NOT NULL OR j.concurrency_key IS NOT NULL, p_worker, p_now,
               p_until
        FROM del d JOIN chunkd.jobs j ON j.id = d.job_id
    ), started AS (
        UPDATE chunkd.jobs j SET started_at = now()
        WHERE j.id IN (SELECT d.job_id FROM del d) AND j.started_at IS NULL
    ), kind_debit AS (
        UPDATE chunkd.kind_flow k
        SET tokens = b.level - coalesce(u.n, 0), refilled_at = greatest(k.refilled_at, p_now)
        FROM unnest(rl_kinds, rl_levels) AS b(kind, level)
        LEFT JOIN (SELECT d.kind, count(*) AS n FROM del d GROUP BY d.kind) u ON u.kind = b.kind
        WHERE k.kind = b.kind
    ), job_debit AS (
        UPDATE chunkd.job_rates r
        SET tokens = b.level - coalesce(u.n, 0), refilled_at = greatest(r.refilled_at, p_now)
        FROM unnest(jr_ids, jr_levels) AS b(job_id, level)
        LEFT JOIN (SELECT d.job_id, count(*) AS n FROM del d GROUP BY d.job_id) u
               ON u.job_id = b.job_id
        WHERE r.job_id = b.job_id
    )
    SELECT d.chunk_id, c.queue_id, c.chunk_id, j.public_id, d.seq, d.attempt + 1, d.kind,
           c.payload, j.payload, p_until, NULL::float8
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.seq;
    GET DIAGNOSTICS n_claimed = ROW_COUNT;

    -- Short of a full batch because a bucket ran dry: say when to come back. The earliest of
    -- those buckets' turns is handed out (and only it is taken, so a claimer short on many
    -- buckets does not hold a turn on each). A claimer that already holds a turn keeps it.
    IF n_claimed >= p_batch OR coalesce(p_waiting_s, 0) > 0 THEN
        RETURN;
    END IF;
    -- The buckets that held chunks back: those cut in the pick, and those so empty that none of
    -- their jobs made the first pass (a kind's rows are locked by this claim, a job's are not).
    SELECT t.kind, t.job_id, t.at INTO turn
    FROM (
        SELECT k.kind, NULL::bigint AS job_id,
               chunkd.bucket_turn(chunkd.bucket_level(k.tokens, k.refilled_at,
                                                      k.per_second::float8, k.burst, p_now),
                                  k.wake_at, k.per_second::float8, k.burst, p_now) AS at
        FROM chunkd.kind_flow k
        WHERE k.kind = ANY (rl_kinds)
          AND (k.kind = ANY (cut_kinds)
               OR (chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                       p_now) < 1
                   AND EXISTS (SELECT 1 FROM chunkd.jobs j
                               WHERE j.kind = k.kind AND j.finished_at IS NULL
                                 AND j.cancelled_at IS NULL AND j.paused_at IS NULL
                                 AND EXISTS (SELECT 1 FROM chunkd.ready r WHERE r.job_id = j.id))))
        UNION ALL
        SELECT NULL, r.job_id,
               chunkd.bucket_turn(chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second,
                                                      r.burst, p_now),
                                  r.wake_at, r.per_second, r.burst, p_now)
        FROM chunkd.job_rates r
        JOIN chunkd.jobs j ON j.id = r.job_id
        WHERE (r.job_id = ANY (cut_jobs)
               OR (chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst, p_now) < 1
                   AND NOT r.job_id = ANY (jr_ids)
                   AND EXISTS (SELECT 1 FROM chunkd.ready x WHERE x.job_id = r.job_id)))
          AND j.max_per_second IS NOT NULL AND j.finished_at IS NULL
          AND j.cancelled_at IS NULL AND j.paused_at IS NULL
          AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
    ) t
    ORDER BY t.at
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Only that turn is recorded. A kind's row is locked by this claim already; a job's bucket
    -- is taken only if free (never wait on another claimer).
    IF turn.kind IS NOT NULL THEN
        UPDATE chunkd.kind_flow k SET wake_at = turn.at WHERE k.kind = turn.kind;
    ELSE
        UPDATE chunkd.job_rates r SET wake_at = turn.at
        WHERE r.job_id = (SELECT x.job_id FROM chunkd.job_rates x WHERE x.job_id = turn.job_id
                          FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::uuid, NULL::uuid, NULL::uuid, NULL::int, NULL::int,
                        NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                        greatest(0, extract(epoch FROM turn.at - clock_timestamp()))::float8;
END;
$$;

DROP FUNCTION chunkd.claim_limited(text, int, text[], timestamptz);

-- The claim of schema version 2, kept (with its grants) for daemons of that version during a
-- rolling upgrade and for callers in other languages: flow control applies to it too.
CREATE OR REPLACE FUNCTION chunkd.claim_chunks(
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
BEGIN
    RETURN QUERY
    SELECT c.id, c.queue_id, c.chunk_id, c.sync_job_id, c.seq, c.attempt, c.kind, c.payload,
           c.job_payload, c.lease_expires_at
    FROM chunkd.claim_or_wait(claim_chunks.worker_id, claim_chunks.batch_size,
                              claim_chunks.kinds, claim_chunks.lease_s) c
    WHERE c.id IS NOT NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Pause and resume
-- ---------------------------------------------------------------------------------------------

-- Pauses a job: nothing of it is claimed from the moment this commits (claims under way finish
-- first: SHARE on `ready` waits for them, and claims started later see the pause); chunks in
-- flight finish normally; retries keep their schedule (they wait, due, until resume). Returns
-- how many chunks it holds back (pending now). Pausing a paused job changes nothing.
CREATE FUNCTION chunkd.pause_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '10s'
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    job_cancelled timestamptz;
BEGIN
    SELECT j.id, j.cancelled_at INTO job, job_cancelled
    FROM chunkd.jobs j WHERE j.public_id = sync_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    IF job_cancelled IS NOT NULL THEN
        RAISE EXCEPTION 'chunkd: sync job % is cancelled; there is nothing to pause', sync_job_id
            USING ERRCODE = '55000';
    END IF;
    LOCK TABLE chunkd.ready IN SHARE MODE;
    UPDATE chunkd.jobs j SET paused_at = now() WHERE j.id = job AND j.paused_at IS NULL;
    IF FOUND THEN
        INSERT INTO chunkd.events (job_id, event, status, attempt, worker_id)
        VALUES (job, 'paused', 'paused', 0, session_user);
    END IF;
    RETURN (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = job)
         + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = job);
END;
$$;

-- Resumes a paused job and wakes idle daemons (NOTIFY). Returns how many chunks are pending.
CREATE FUNCTION chunkd.resume_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
BEGIN
    SELECT j.id INTO job FROM chunkd.jobs j WHERE j.public_id = sync_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    UPDATE chunkd.jobs j SET paused_at = NULL WHERE j.id = job AND j.paused_at IS NOT NULL;
    IF FOUND THEN
        INSERT INTO chunkd.events (job_id, event, status, attempt, worker_id)
        VALUES (job, 'resumed', 'pending', 0, session_user);
        PERFORM pg_notify('chunkd', '0');
    END IF;
    RETURN (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = job)
         + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = job);
END;
$$;

-- Pending chunks of the unfinished jobs of a kind.
CREATE FUNCTION chunkd.pending_of_kind(kind text) RETURNS int
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT coalesce(sum((SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
                        + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id)), 0)::int
    FROM chunkd.jobs j
    WHERE j.kind = pending_of_kind.kind AND j.finished_at IS NULL AND j.cancelled_at IS NULL;
END;

-- Pauses every job of a kind, present and future, as pause_sync_job pauses one. Returns how many
-- chunks it holds back.
CREATE FUNCTION chunkd.pause_kind(kind text) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '10s'
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM chunkd.check_name('kind', kind);
    LOCK TABLE chunkd.ready IN SHARE MODE;
    INSERT INTO chunkd.kind_flow AS k (kind, paused_at) VALUES (kind, now())
    ON CONFLICT ON CONSTRAINT kind_flow_pkey DO UPDATE SET paused_at = now(), changed_at = now()
        WHERE k.paused_at IS NULL;
    IF FOUND THEN
        INSERT INTO chunkd.events (kind, event, status, attempt, worker_id)
        VALUES (kind, 'paused', 'paused', 0, session_user);
    END IF;
    RETURN chunkd.pending_of_kind(kind);
END;
$$;

CREATE FUNCTION chunkd.resume_kind(kind text) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM chunkd.check_name('kind', kind);
    -- The row goes when no control is left; a rate stays.
    DELETE FROM chunkd.kind_flow k
    WHERE k.kind = kind AND k.paused_at IS NOT NULL AND k.per_second IS NULL;
    IF NOT FOUND THEN
        UPDATE chunkd.kind_flow k SET paused_at = NULL, changed_at = now()
        WHERE k.kind = kind AND k.paused_at IS NOT NULL;
    END IF;
    IF FOUND THEN
        INSERT INTO chunkd.events (kind, event, status, attempt, worker_id)
        VALUES (kind, 'resumed', 'pending', 0, session_user);
        PERFORM pg_notify('chunkd', '0');
    END IF;
    RETURN chunkd.pending_of_kind(kind);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Limits
-- ---------------------------------------------------------------------------------------------

-- A kind's rate: at most per_second claims per second of its chunks, fleet-wide, and at most
-- burst at once after an idle spell (default: a third of a second's worth, at least 1). per_second
-- NULL removes the limit. A changed limit keeps the tokens the bucket holds (up to the new
-- burst); a new one starts full.
CREATE FUNCTION chunkd.set_rate_limit(kind text, per_second numeric, burst int DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    new_burst int;
BEGIN
    PERFORM chunkd.check_name('kind', kind);
    PERFORM chunkd.check_rate('per_second', per_second);
    IF burst IS NOT NULL AND burst < 1 THEN
        RAISE EXCEPTION 'chunkd: burst must be NULL (the default) or >= 1, got %', burst
            USING ERRCODE = '22023';
    END IF;
    IF per_second IS NULL THEN
        IF burst IS NOT NULL THEN
            RAISE EXCEPTION 'chunkd: a burst needs a rate' USING ERRCODE = '22023';
        END IF;
        DELETE FROM chunkd.kind_flow k WHERE k.kind = kind AND k.paused_at IS NULL;
        UPDATE chunkd.kind_flow k
        SET per_second = NULL, burst = NULL, wake_at = NULL, changed_at = now()
        WHERE k.kind = kind AND k.per_second IS NOT NULL;
    ELSE
        new_burst := coalesce(burst, chunkd.default_burst(per_second));
        INSERT INTO chunkd.kind_flow AS k (kind, per_second, burst, tokens, refilled_at)
        VALUES (kind, per_second, new_burst, new_burst, clock_timestamp())
        ON CONFLICT ON CONSTRAINT kind_flow_pkey DO UPDATE
        SET tokens = CASE WHEN k.per_second IS NULL THEN new_burst
                          ELSE least(new_burst, chunkd.bucket_level(k.tokens, k.refilled_at,
                                                                    k.per_second::float8, k.burst,
                                                                    clock_timestamp()))
                     END,
            refilled_at = greatest(k.refilled_at, clock_timestamp()),
            per_second = excluded.per_second, burst = new_burst, wake_at = NULL,
            changed_at = now();
    END IF;
    PERFORM pg_notify('chunkd', '0');
END;
$$;

-- At most max_concurrency chunks of all unfinished jobs with this concurrency key processing at
-- once, fleet-wide. NULL removes the limit.
CREATE FUNCTION chunkd.set_concurrency_limit(key text, max_concurrency int) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM chunkd.check_name('key', key);
    IF max_concurrency IS NULL THEN
        DELETE FROM chunkd.concurrency_limits l WHERE l.key = key;
    ELSIF max_concurrency < 1 THEN
        RAISE EXCEPTION 'chunkd: max_concurrency must be NULL (no limit) or >= 1, got %',
            max_concurrency USING ERRCODE = '22023';
    ELSE
        INSERT INTO chunkd.concurrency_limits AS l (key, max_concurrency)
        VALUES (key, max_concurrency)
        ON CONFLICT ON CONSTRAINT concurrency_limits_pkey DO UPDATE
        SET max_concurrency = excluded.max_concurrency, changed_at = now();
    END IF;
    PERFORM pg_notify('chunkd', '0');
END;
$$;

-- The flow controls in effect: every paused or rate-limited kind, every concurrency key with a
-- limit or with unfinished jobs, and every paused unfinished job; with what each has in flight
-- and pending now.
CREATE FUNCTION chunkd.flow_limits()
RETURNS TABLE (
    scope text,               -- 'kind', 'key' or 'job'
    name text,                -- the kind, the key, or the job's id
    paused_at timestamptz,
    per_second numeric,
    burst int,
    tokens float8,            -- whole tokens are chunks that may start now
    max_concurrency int,
    processing bigint,
    pending bigint,
    active_jobs bigint
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT 'kind', k.kind, k.paused_at, k.per_second, k.burst,
           CASE WHEN k.per_second IS NOT NULL
                THEN chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp())
           END,
           NULL::int,
           (SELECT count(*) FROM chunkd.jobs j JOIN chunkd.attempts a ON a.job_id = j.id
            WHERE j.kind = k.kind AND j.finished_at IS NULL AND j.cancelled_at IS NULL
              AND a.ended_at IS NULL),
           chunkd.pending_of_kind(k.kind)::bigint,
           (SELECT count(*) FROM chunkd.jobs j
            WHERE j.kind = k.kind AND j.finished_at IS NULL AND j.cancelled_at IS NULL)
    FROM chunkd.kind_flow k
    UNION ALL
    SELECT 'key', x.key, NULL, NULL, NULL, NULL, l.max_concurrency,
           (SELECT count(*) FROM chunkd.jobs j JOIN chunkd.attempts a ON a.job_id = j.id
            WHERE j.concurrency_key = x.key AND j.finished_at IS NULL AND a.ended_at IS NULL),
           (SELECT coalesce(sum((SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
                                + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id)),
                            0)::bigint
            FROM chunkd.jobs j
            WHERE j.concurrency_key = x.key AND j.finished_at IS NULL AND j.cancelled_at IS NULL),
           (SELECT count(*) FROM chunkd.jobs j
            WHERE j.concurrency_key = x.key AND j.finished_at IS NULL AND j.cancelled_at IS NULL)
    FROM (
        SELECT l.key FROM chunkd.concurrency_limits l
        UNION
        SELECT j.concurrency_key FROM chunkd.jobs j
        WHERE j.concurrency_key IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
    ) x
    LEFT JOIN chunkd.concurrency_limits l ON l.key = x.key
    UNION ALL
    SELECT 'job', j.public_id::text, j.paused_at, j.max_per_second, r.burst::int,
           CASE WHEN r.job_id IS NOT NULL
                THEN chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst,
                                         clock_timestamp())
           END,
           j.max_concurrency,
           (SELECT count(*) FROM chunkd.attempts a WHERE a.job_id = j.id AND a.ended_at IS NULL),
           (SELECT count(*) FROM chunkd.ready q WHERE q.job_id = j.id)
           + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id),
           NULL::bigint
    FROM chunkd.jobs j
    LEFT JOIN chunkd.job_rates r ON r.job_id = j.id
    WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
    ORDER BY 1, 2;
END;

-- ---------------------------------------------------------------------------------------------
-- Monitoring and the seed's objects
-- ---------------------------------------------------------------------------------------------

-- overall_status 'paused': an unfinished job that is paused, or whose kind is. The dashboard's
-- functions read it from chunkd.overall_status(), the view spells it out (version 5 says why).
CREATE OR REPLACE FUNCTION chunkd.overall_status(j chunkd.jobs) RETURNS text
LANGUAGE sql STABLE
RETURN CASE
    WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
    WHEN j.finished_at IS NULL THEN
        CASE WHEN j.paused_at IS NOT NULL
                  OR EXISTS (SELECT 1 FROM chunkd.kind_flow k
                             WHERE k.kind = j.kind AND k.paused_at IS NOT NULL) THEN 'paused'
             WHEN j.started_at IS NOT NULL THEN 'processing'
             WHEN j.run_at > now() THEN 'scheduled'
             ELSE 'pending' END
    WHEN j.failed_chunks > 0 THEN 'partial_failure'
    WHEN j.cancelled_chunks > 0 THEN 'cancelled'
    ELSE 'completed'
END;

CREATE OR REPLACE VIEW chunkd.chunk_processing_status AS
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
            CASE WHEN j.paused_at IS NOT NULL
                      OR EXISTS (SELECT 1 FROM chunkd.kind_flow k
                                 WHERE k.kind = j.kind AND k.paused_at IS NOT NULL) THEN 'paused'
                 WHEN j.started_at IS NOT NULL THEN 'processing'
                 WHEN j.run_at > now() THEN 'scheduled'
                 ELSE 'pending' END
        WHEN j.failed_chunks > 0 THEN 'partial_failure'
        WHEN j.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END AS overall_status,
    coalesce(round((j.completed_chunks + j.failed_chunks + j.cancelled_chunks) * 100.0
                   / nullif(j.total_chunks, 0), 2), 0) AS progress_percentage,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.run_at
FROM chunkd.jobs j
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
           + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id) AS pending
) c;

CREATE OR REPLACE VIEW chunkd.sync_jobs AS
SELECT j.public_id AS id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority,
       j.total_chunks, j.cancelled_at, j.created_at, j.started_at, j.finished_at, j.run_at,
       j.dedupe_key, j.paused_at, j.max_per_second, j.concurrency_key
FROM chunkd.jobs j;

-- The per-chunk audit trail gains a kind column; the pause and resume of a job or of a kind
-- are job-level rows, with job_finished, in job_events (which gains the kind and who did it).
CREATE OR REPLACE VIEW chunkd.chunk_events AS
SELECT c.queue_id, j.public_id AS sync_job_id, 'enqueued'::text AS event, 'pending'::text AS status,
       0 AS attempt, NULL::text AS worker_id, NULL::text AS error, c.created_at AS at,
       j.kind
FROM chunkd.chunks c JOIN chunkd.jobs j ON j.id = c.job_id
WHERE NOT c.legacy
UNION ALL
SELECT c.queue_id, j.public_id, 'claimed', 'processing', a.attempt, a.worker_id, NULL,
       a.claimed_at, j.kind
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE NOT a.legacy
UNION ALL
SELECT c.queue_id, j.public_id, a.outcome,
       CASE WHEN NOT a.final THEN 'pending'
            WHEN a.outcome IN ('completed', 'cancelled') THEN a.outcome ELSE 'failed' END,
       CASE WHEN a.outcome = 'released' THEN a.attempt - 1 ELSE a.attempt END,
       a.worker_id, a.error, a.ended_at, j.kind
FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id JOIN chunkd.jobs j ON j.id = a.job_id
WHERE a.ended_at IS NOT NULL
UNION ALL
SELECT c.queue_id, j.public_id, e.event, e.status, e.attempt, e.worker_id, e.error, e.at, j.kind
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id JOIN chunkd.chunks c ON c.id = e.chunk_id
UNION ALL
SELECT v.queue_id, v.sync_job_id, v.event, v.status, v.attempt, v.worker_id, v.error, v.at,
       j.kind
FROM chunkd.events_v1 v LEFT JOIN chunkd.jobs j ON j.public_id = v.sync_job_id;

CREATE OR REPLACE VIEW chunkd.job_events AS
SELECT j.public_id AS sync_job_id, e.event, e.status, e.detail, e.at,
       coalesce(j.kind, e.kind) AS kind, e.worker_id
FROM chunkd.events e LEFT JOIN chunkd.jobs j ON j.id = e.job_id
WHERE e.chunk_id IS NULL;

-- Live queue depth for metrics: pending (due now and free to run), paused (due, held by a
-- paused job or kind), throttled (due, under a rate limit or a concurrency key's limit: they
-- run at its pace), scheduled (waiting for a retry's run_at) and processing. Reads only live
-- rows, never the finished history.
CREATE OR REPLACE FUNCTION chunkd.queue_depth()
RETURNS TABLE (status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH paused_jobs AS (
        SELECT j.id FROM chunkd.jobs j
        WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
    ), due AS (
        SELECT CASE
                   WHEN k.paused_at IS NOT NULL
                        OR r.job_id = ANY (ARRAY(SELECT p.id FROM paused_jobs p))
                   THEN 'paused'
                   WHEN k.per_second IS NOT NULL
                        OR (r.limited AND (j.max_per_second IS NOT NULL
                                           OR EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                                                      WHERE l.key = j.concurrency_key)))
                   THEN 'throttled'
                   ELSE 'pending'
               END AS status
        FROM chunkd.ready r
        LEFT JOIN chunkd.kind_flow k ON k.kind = r.kind
        LEFT JOIN chunkd.jobs j ON r.limited AND j.id = r.job_id
    )
    SELECT s.status, coalesce(n.chunks, 0)
    FROM (VALUES (1, 'pending'), (2, 'paused'), (3, 'throttled')) AS s(o, status)
    LEFT JOIN (SELECT d.status, count(*) AS chunks FROM due d GROUP BY d.status) n
           ON n.status = s.status
    UNION ALL
    SELECT 'scheduled', count(*) FROM chunkd.scheduled
    UNION ALL
    SELECT 'processing', count(*) FROM chunkd.attempts a WHERE a.ended_at IS NULL;
END;

-- ---------------------------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkd FROM PUBLIC;

-- Whoever could run the daemon of schema version 2 can run this one: EXECUTE on claim_chunks
-- (the version 2 daemon's claim) brings EXECUTE on claim_or_wait.
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT r.rolname
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
        JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
        WHERE f.oid = 'chunkd.claim_chunks(text, int, text[], float8)'::regprocedure
          AND acl.privilege_type = 'EXECUTE' AND acl.grantee <> f.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION chunkd.claim_or_wait(text, int, text[], float8, '
                       'float8) TO %I', grantee);
    END LOOP;
END;
$$;
