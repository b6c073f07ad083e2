-- Enqueue: checking job specs and chunk arrays, creating jobs (one or many in a call), and
-- adding chunks to an existing job.

-- What changed shape is dropped here, in the transaction that creates it again below, so no
-- caller ever finds it missing: a longer argument list is another function.
-- create_sync_job gained traceparent as a trailing argument with a default: every call of the
-- old one, positional or named, resolves to the new one, which inherits its grants (below), so
-- chunkd migrate lets this drop through while daemons of an older chunkd run.
DO $$
BEGIN
    IF to_regprocedure('chunkd.create_sync_job(text,jsonb,jsonb,integer,integer,integer,'
                       'timestamp with time zone,text,boolean,text,numeric,text)') IS NOT NULL THEN
        DROP FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text,
                                             boolean, text, numeric, text);
    END IF;
END;
$$;

-- Whether t is a W3C traceparent (https://www.w3.org/TR/trace-context/#traceparent-header) of
-- the form chunkd stores: version-trace id-parent id-flags, lowercase hex, neither id all
-- zeros, version not ff. The same test as the check jobs_traceparent_w3c (migration 14).
CREATE OR REPLACE FUNCTION chunkd.is_traceparent(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN t ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
       AND left(t, 2) <> 'ff'
       AND substr(t, 4, 32) <> repeat('0', 32)
       AND substr(t, 37, 16) <> repeat('0', 16);

-- Checks a JSON array of chunk payloads against the enqueue limits; returns how many.
CREATE OR REPLACE FUNCTION chunkd.check_chunks(chunks jsonb, allow_empty boolean) RETURNS int
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
BEGIN
    IF chunks IS NULL OR jsonb_typeof(chunks) <> 'array' THEN
        RAISE EXCEPTION 'chunkd: chunks must be a JSON array of chunk payloads, got %',
            coalesce(jsonb_typeof(chunks), 'null') USING ERRCODE = '22023';
    END IF;
    n := jsonb_array_length(chunks);
    IF n = 0 AND NOT allow_empty THEN
        RAISE EXCEPTION 'chunkd: chunks must not be empty' USING ERRCODE = '22023';
    END IF;
    IF pg_column_size(chunks) > 16 * 1024 * 1024 THEN
        RAISE EXCEPTION 'chunkd: chunks are % bytes, above the limit of 16 MiB per job (or per append)',
            pg_column_size(chunks) USING ERRCODE = '54000';
    END IF;
    IF n > 1000000 THEN
        RAISE EXCEPTION 'chunkd: % chunks in one job, above the limit of 1,000,000', n
            USING ERRCODE = '54000';
    END IF;
    RETURN n;
END;
$$;

-- Which key of one job object does not convert to its column's type, and why (NULL: none).
-- Only called after job_spec_rows failed, to say where.
CREATE OR REPLACE FUNCTION chunkd.job_spec_problem(spec jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text;
BEGIN
    FOR key IN SELECT k FROM jsonb_object_keys(spec) k ORDER BY k LOOP
        BEGIN
            PERFORM FROM chunkd.job_spec_rows(
                jsonb_build_array(jsonb_build_object(key, spec -> key)));
        EXCEPTION WHEN data_exception THEN
            RETURN format('%s: %s', key, SQLERRM);
        END;
    END LOOP;
    RETURN NULL;
END;
$$;

-- The job objects of create_sync_jobs and create_jobs, one typed row each, with
-- create_sync_job's defaults for absent keys. The columns after `ord` are the accepted keys
-- (misshapen_job_specs reads them from here): a new option is a new column here, a check in
-- invalid_job_spec and create_jobs, and a column in create_jobs' insert. Adding a column
-- changes the result type, which CREATE OR REPLACE cannot: that is a new function beside this
-- one, and the old one stays until a later release drops it.
CREATE OR REPLACE FUNCTION chunkd.job_spec_rows(jobs jsonb)
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
    concurrency_key text,
    traceparent text,
    label text
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
           x.concurrency_key,
           x.traceparent,
           x.label
    FROM jsonb_array_elements(job_spec_rows.jobs) WITH ORDINALITY AS e(spec, ord)
    CROSS JOIN LATERAL jsonb_to_record(e.spec) AS x(
        kind text, chunks jsonb, payload jsonb, max_concurrency int, max_attempts int,
        priority int, run_at timestamptz, dedupe_key text, open boolean, on_finish_kind text,
        max_per_second numeric, concurrency_key text, traceparent text, label text);
END;

-- The job objects as read before traceparents and labels (schema versions 6 to 13). Nothing
-- calls it any more;
-- it stays because a migration that drops a function is refused while daemons of another
-- chunkd version run (docs/migrations.md), and goes in a later release's migration.
CREATE OR REPLACE FUNCTION chunkd.job_specs(jobs jsonb)
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

CREATE OR REPLACE FUNCTION chunkd.invalid_job_spec(jobs jsonb) RETURNS TABLE (ord int)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT s.ord
    FROM chunkd.job_spec_rows(invalid_job_spec.jobs) s
    WHERE (s.kind IS NOT NULL AND length(s.kind) BETWEEN 1 AND 200
           AND CASE WHEN jsonb_typeof(s.chunks) = 'array'
                    THEN jsonb_array_length(s.chunks)
                         BETWEEN CASE WHEN s.open THEN 0 ELSE 1 END AND 1000000
                         AND pg_column_size(s.chunks) <= 16 * 1024 * 1024
                    ELSE false END
           AND pg_column_size(s.payload) <= 1024 * 1024
           AND (s.max_concurrency IS NULL OR s.max_concurrency >= 1)
           AND s.max_attempts >= 1
           AND (s.run_at IS NULL OR chunkd.is_storable_time(s.run_at))
           AND (s.dedupe_key IS NULL OR length(s.dedupe_key) BETWEEN 1 AND 256)
           AND (s.on_finish_kind IS NULL OR length(s.on_finish_kind) BETWEEN 1 AND 200)
           AND (s.max_per_second IS NULL
                OR (s.max_per_second > 0 AND s.max_per_second < 'Infinity'))
           AND (s.concurrency_key IS NULL OR length(s.concurrency_key) BETWEEN 1 AND 200)
           AND (s.traceparent IS NULL OR chunkd.is_traceparent(s.traceparent))
           AND (s.label IS NULL OR length(s.label) BETWEEN 1 AND 200)
          ) IS NOT TRUE
    ORDER BY s.ord
    LIMIT 1;
END;

CREATE OR REPLACE FUNCTION chunkd.misshapen_job_specs(jobs jsonb)
RETURNS TABLE (ord int, problem text)
LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH known AS (
        SELECT array_agg(a.name ORDER BY a.i) AS keys
        FROM pg_catalog.pg_proc p
        CROSS JOIN LATERAL unnest(p.proargnames, p.proargmodes) WITH ORDINALITY AS a(name, mode, i)
        WHERE p.oid = 'chunkd.job_spec_rows(jsonb)'::regprocedure AND a.mode = 't'
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

-- Chunks appended to a job (continuations, open jobs) are limited like the job's others.
CREATE OR REPLACE FUNCTION chunkd.add_chunks(job bigint, chunks jsonb, continued boolean) RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    j record;
    n int := jsonb_array_length(chunks);
    first_turn bigint;
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
    -- From the current turn, or after the job's last waiting chunk: its own chunks keep their
    -- seq order.
    first_turn := greatest(chunkd.current_turn(j.priority),
                           (SELECT r.turn + 1 FROM chunkd.ready r WHERE r.job_id = job
                            ORDER BY r.seq DESC LIMIT 1));
    WITH c AS (
        INSERT INTO chunkd.chunks (job_id, seq, payload)
        SELECT job, j.total_chunks + (e.ordinality - 1)::int, e.value
        FROM jsonb_array_elements(chunks) WITH ORDINALITY AS e(value, ordinality)
        RETURNING chunks.id, chunks.seq
    )
    INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, turn)
    SELECT c.id, job, c.seq, j.priority, j.kind, j.limited, first_turn + c.seq - j.total_chunks
    FROM c;
    UPDATE chunkd.jobs x
    SET total_chunks = x.total_chunks + n,
        appended_chunks = x.appended_chunks + CASE WHEN continued THEN n ELSE 0 END
    WHERE x.id = job;
    RETURN n;
END;
$$;

-- The one place where jobs are validated and written (create_sync_job, create_sync_jobs,
-- schedules' fires); says per job whether it was created or an unfinished job with the same
-- dedupe key was returned instead. run_at delays the chunks (they wait in `scheduled`);
-- max_per_second creates the job's token bucket, full; a job under max_concurrency,
-- max_per_second or a concurrency_key is claimed by the slow path (`limited`).
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
        SELECT s.* INTO bad FROM chunkd.job_spec_rows(p_jobs) s WHERE s.ord = bad_ord;
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
        ELSIF NOT chunkd.is_storable_time(bad.run_at) THEN
            RAISE EXCEPTION 'chunkd: %run_at must be a finite timestamp from 0001-01-01 to '
                '9999-12-31 UTC (NULL: at once), got %', where_, bad.run_at
                USING ERRCODE = '22023';
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
        ELSIF NOT chunkd.is_traceparent(bad.traceparent) THEN
            RAISE EXCEPTION 'chunkd: %traceparent must be a W3C traceparent '
                '(00-<32 hex digits>-<16 hex digits>-<2 hex digits>, lowercase; NULL: none), '
                'got %', where_, to_jsonb(left(bad.traceparent, 80)) USING ERRCODE = '22023';
        ELSIF length(bad.label) = 0 OR length(bad.label) > 200 THEN
            RAISE EXCEPTION 'chunkd: %label must be NULL (no label) or a non-empty text of at '
                'most 200 characters, got % characters', where_, length(bad.label)
                USING ERRCODE = '22023';
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
            FROM chunkd.job_spec_rows(p_jobs) s
            WHERE pending IS NULL OR pending[s.ord]
        ), ins AS (
            INSERT INTO chunkd.jobs AS j (public_id, kind, payload, max_concurrency,
                                          max_attempts, priority, total_chunks, run_at,
                                          dedupe_key, open, on_finish_kind, max_per_second,
                                          concurrency_key, traceparent, label)
            SELECT i.public_id, i.kind, i.payload, i.max_concurrency, i.max_attempts,
                   i.priority, jsonb_array_length(i.chunks), i.run_at, i.dedupe_key, i.open,
                   i.on_finish_kind, i.max_per_second, i.concurrency_key, i.traceparent, i.label
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
        ), turns AS MATERIALIZED (
            -- A job's chunk n is served n turns after the current one (fair turns). Computed
            -- once per priority: inlined, the join could read current_turn once per chunk, and
            -- while a snapshot is held each read walks the ready index's dead entries.
            SELECT p.priority, chunkd.current_turn(p.priority) AS turn
            FROM (SELECT DISTINCT m.priority FROM made m WHERE NOT m.later) p
        ), now_due AS (
            INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, turn)
            SELECT c.id, c.job_id, c.seq, m.priority, m.kind, m.limited, t.turn + c.seq
            FROM c JOIN made m ON m.id = c.job_id JOIN turns t ON t.priority = m.priority
            WHERE NOT m.later
        ), due_later AS (
            INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims,
                                          attempt, run_at, turn)
            SELECT c.id, c.job_id, c.seq, m.priority, m.kind, m.limited, 0, 0, m.run_at, c.seq
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
        FROM chunkd.job_spec_rows(p_jobs) s
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

-- The public enqueue (the seed's name and first six arguments; later ones are trailing, with
-- defaults): returns the job's id, or the unfinished job's with the same kind and dedupe_key.
-- traceparent: the W3C trace context of the caller's span (NULL: none).
--
-- It has no `label` argument: a label goes through the job objects of create_sync_jobs and
-- create_jobs ({"label": ...}), which is what the Python client, `chunkd enqueue --label` and
-- chunkd.App.enqueue do (each argument added here is a drop and re-create of this function,
-- which producers and fire_schedule call).
-- carry grants: chunkd.create_sync_job(text,jsonb,jsonb,integer,integer,integer,timestamp with time zone,text,boolean,text,numeric,text) -> chunkd.create_sync_job(text,jsonb,jsonb,integer,integer,integer,timestamp with time zone,text,boolean,text,numeric,text,text)
CREATE OR REPLACE FUNCTION chunkd.create_sync_job(
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
    concurrency_key text DEFAULT NULL,
    traceparent text DEFAULT NULL
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
            'concurrency_key', create_sync_job.concurrency_key,
            'traceparent', create_sync_job.traceparent)),
        true) j;
END;

-- Many jobs in one call and one transaction (a planner fanning out one job per mailbox makes
-- one round trip); ids in input order.
CREATE OR REPLACE FUNCTION chunkd.create_sync_jobs(jobs jsonb) RETURNS SETOF uuid
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT j.sync_job_id FROM chunkd.create_jobs(create_sync_jobs.jobs) j ORDER BY j.ord;
END;
