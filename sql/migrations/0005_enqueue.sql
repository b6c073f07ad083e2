-- chunkd schema version 5: delayed start, dedupe keys, bulk enqueue.
--
-- create_sync_job gains two trailing arguments, run_at and dedupe_key; create_sync_jobs creates
-- many jobs in one call. Both go through chunkd.create_jobs, the one place where a job is
-- validated and written, which also says whether each job was created or an unfinished job
-- with the same dedupe key was returned instead (`chunkd enqueue` tells the user).
--
-- A delayed job's chunks wait in `scheduled` with the job's run_at, like a retry's backoff:
-- claims never see them before then (promote_due moves them to `ready`), and the daemon arms a
-- timer from a NOTIFY sent when the job commits.
--
-- A dedupe key is unique per kind among unfinished jobs (a partial unique index), so racing
-- producers get one job, never two; once the job has finished or is cancelled the key is free.

SET LOCAL lock_timeout = '60s';

-- ---------------------------------------------------------------------------------------------
-- Carrying grants over a changed signature
-- ---------------------------------------------------------------------------------------------

-- A function whose argument list changes is a new function (DROP + CREATE), and the EXECUTE
-- grants operators gave on the old one would be lost with it. Create the new one first, call
-- this, then drop the old one: every role that could execute the old function (directly, not
-- through PUBLIC, which is never granted anything here) can execute the new one, with the
-- grant option where it had it. Returns how many roles it granted. For migrations (run by the
-- owner); nobody else may call it.
CREATE FUNCTION chunkd.carry_grants(old_function regprocedure, new_function regprocedure)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    grantee record;
    n int := 0;
BEGIN
    FOR grantee IN
        SELECT r.rolname, bool_or(acl.is_grantable) AS grantable
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
        JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
        WHERE f.oid = old_function AND acl.privilege_type = 'EXECUTE'
          AND acl.grantee <> f.proowner
        GROUP BY r.rolname
        ORDER BY r.rolname
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I%s', new_function, grantee.rolname,
                       CASE WHEN grantee.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Jobs: run_at and dedupe_key
-- ---------------------------------------------------------------------------------------------

-- run_at: as given (NULL = at once); the job is `scheduled` while it lies ahead and nothing has
-- started. dedupe_key: at most one unfinished, uncancelled job per (kind, key). The index
-- makes no column the hot path updates an indexed one (finished_at and cancelled_at were in
-- jobs_limited_active's predicate already), so the counter updates stay HOT.
ALTER TABLE chunkd.jobs
    ADD COLUMN run_at timestamptz,
    ADD COLUMN dedupe_key text
        CHECK (dedupe_key IS NULL OR length(dedupe_key) BETWEEN 1 AND 256);
CREATE UNIQUE INDEX jobs_dedupe ON chunkd.jobs (kind, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND finished_at IS NULL AND cancelled_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Enqueue
-- ---------------------------------------------------------------------------------------------

-- The job objects of create_sync_jobs, one row each, typed, with create_sync_job's defaults
-- for absent keys. The columns after `ord` are the accepted keys: a new option is a new
-- column here, then a check in invalid_job_spec and a column in create_jobs' insert.
--
-- The helpers of create_jobs below have SQL-standard bodies, parsed when they are created, so
-- no name in them is looked up at call time, and no SET search_path: with one they could not
-- be inlined into create_jobs' statements, and every call would plan their body anew.
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
    on_finish_kind text
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
           x.on_finish_kind
    FROM jsonb_array_elements(job_specs.jobs) WITH ORDINALITY AS e(spec, ord)
    CROSS JOIN LATERAL jsonb_to_record(e.spec) AS x(
        kind text, chunks jsonb, payload jsonb, max_concurrency int, max_attempts int,
        priority int, run_at timestamptz, dedupe_key text, open boolean, on_finish_kind text);
END;

-- The first job object that is not an object or has a key job_specs does not know (a
-- misspelt "dedupe_key" must not pass silently), and what is wrong with it.
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

-- The position of the first job whose values are out of bounds (create_jobs says which
-- bound); one cheap test per job.
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
          ) IS NOT TRUE
    ORDER BY s.ord
    LIMIT 1;
END;

-- Which key of one job object does not convert to its column's type, and why (NULL: none).
-- Only called after job_specs failed, to say where.
CREATE FUNCTION chunkd.job_spec_problem(spec jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text;
BEGIN
    FOR key IN SELECT k FROM jsonb_object_keys(spec) k ORDER BY k LOOP
        BEGIN
            PERFORM FROM chunkd.job_specs(jsonb_build_array(jsonb_build_object(key, spec -> key)));
        EXCEPTION WHEN data_exception THEN
            RETURN format('%s: %s', key, SQLERRM);
        END;
    END LOOP;
    RETURN NULL;
END;
$$;

-- Creates jobs from a JSON array of job objects (keys: create_sync_job's argument names), in
-- one statement for all of them: one row per job, in input order, with the job's id and
-- whether it was created (false: an unfinished job of the same kind with the same dedupe key
-- exists, and its id is returned). Nothing is written unless every job is valid. Errors name
-- the job (`jobs[3]: ...`, 0-based) unless `single`: create_sync_job's call, whose one object
-- it built itself from typed arguments (so its shape and types need no checking).
CREATE FUNCTION chunkd.create_jobs(jobs jsonb, single boolean DEFAULT false)
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
                                          dedupe_key, open, on_finish_kind)
            SELECT i.public_id, i.kind, i.payload, i.max_concurrency, i.max_attempts,
                   i.priority, jsonb_array_length(i.chunks), i.run_at, i.dedupe_key, i.open,
                   i.on_finish_kind
            FROM input i
            ORDER BY i.dedupe_key IS NULL, i.kind, i.dedupe_key, i.ord
            ON CONFLICT (kind, dedupe_key)
                WHERE dedupe_key IS NOT NULL AND finished_at IS NULL AND cancelled_at IS NULL
                DO NOTHING
            RETURNING j.id, j.public_id, j.kind, j.priority,
                      j.max_concurrency IS NOT NULL AS limited,
                      coalesce(j.run_at > now(), false) AS later, j.run_at
        ), made AS (
            SELECT ins.*, i.ord, i.chunks FROM ins JOIN input i ON i.public_id = ins.public_id
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

-- The public enqueue: version 1's six arguments, then run_at and dedupe_key, then version 3's
-- open and on_finish_kind. A new signature is a new function: created beside the old one, the
-- old one's grants carried over, then the old one dropped.
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
    on_finish_kind text DEFAULT NULL
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
            'on_finish_kind', create_sync_job.on_finish_kind)),
        true) j;
END;

SELECT chunkd.carry_grants(
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, boolean, text)',
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text)');
DROP FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, boolean, text);

-- Many jobs in one call and one transaction (a planner fanning out one job per mailbox makes
-- one round trip); ids in input order.
CREATE FUNCTION chunkd.create_sync_jobs(jobs jsonb) RETURNS SETOF uuid
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT j.sync_job_id FROM chunkd.create_jobs(create_sync_jobs.jobs) j ORDER BY j.ord;
END;

-- A delayed job wakes the daemons when it commits: the payload is the seconds until its run_at
-- by the database clock at commit (rounded up to the millisecond, so a timer never fires before
-- the chunks are due), whatever the caller did in its transaction after enqueueing. (The
-- scheduled rows' own NOTIFY counts from the insert.)
CREATE FUNCTION chunkd.trigger_run_at_notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('chunkd', round(greatest(0, ceil(
        extract(epoch FROM NEW.run_at - clock_timestamp()) * 1000) / 1000), 3)::text);
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER jobs_run_at_notify
    AFTER INSERT ON chunkd.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.run_at > NEW.created_at)
    EXECUTE FUNCTION chunkd.trigger_run_at_notify();

-- ---------------------------------------------------------------------------------------------
-- Claim: a limited job waiting for its run_at does not need the slow path
-- ---------------------------------------------------------------------------------------------

-- As in version 2, except the test for the slow path: a limited job whose run_at lies ahead
-- has no chunk in `ready` (all wait in `scheduled`), so it cannot be claimed, and until its
-- run_at it no longer sends every claim of its kinds down claim_limited. Measured (claim +
-- complete of 15,000 unlimited chunks, batch 100, server CPU per chunk): 30 us instead of 25
-- while one delayed max_concurrency job waited, with version 2's test; 20 and 20 with this
-- one. (Replaced in place: the grants stay.)
-- The daemon's claim: `id` is the chunk's internal key, used for its outcome. One statement on
-- the fast path (no limited job of these kinds is active): delete the picked ready rows, insert
-- their attempts, return the payloads.
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
                 AND j.cancelled_at IS NULL AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
                 AND (j.run_at IS NULL OR j.run_at <= now())) THEN
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

-- ---------------------------------------------------------------------------------------------
-- Retry: a job that is unfinished again holds its dedupe key again
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION chunkd.retry_failed_chunks(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    job_cancelled timestamptz;
    job_kind text;
    job_key text;
    holder uuid;
    r_ids bigint[];
    r_claims int[];
BEGIN
    SELECT j.id, j.cancelled_at, j.kind, j.dedupe_key INTO job, job_cancelled, job_kind, job_key
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
    -- First, as it may be refused: the job becomes unfinished, so it takes its key back.
    BEGIN
        UPDATE chunkd.jobs j
        SET failed_chunks = j.failed_chunks - cardinality(r_ids), finished_at = NULL
        WHERE j.id = job;
    EXCEPTION WHEN unique_violation THEN
        SELECT j.public_id INTO holder FROM chunkd.jobs j
        WHERE j.kind = job_kind AND j.dedupe_key = job_key AND j.finished_at IS NULL
          AND j.cancelled_at IS NULL;
        RAISE EXCEPTION 'chunkd: sync job % cannot be retried while job % with the same dedupe '
            'key % is unfinished', sync_job_id, holder, to_jsonb(job_key)
            USING ERRCODE = '55000';
    END;
    INSERT INTO chunkd.events (job_id, chunk_id, event, status, attempt)
    SELECT job, x, 'retried', 'pending', 0 FROM unnest(r_ids) x;
    PERFORM chunkd.requeue(r_ids, r_claims, array_fill(0, ARRAY[cardinality(r_ids)]),
                           array_fill(0::float8, ARRAY[cardinality(r_ids)]));
    RETURN cardinality(r_ids);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Monitoring: the `scheduled` status
-- ---------------------------------------------------------------------------------------------

-- A job's overall status, from its row alone, for the dashboard's functions (a job's counters
-- say everything but pending/processing, which only matter before it finishes). The view below
-- spells the same CASE out: a view's caller needs EXECUTE on every function it calls, and the
-- roles that read the view are granted nothing else. tests/test_web_pages.py holds the two
-- equal in every status.
CREATE FUNCTION chunkd.overall_status(j chunkd.jobs) RETURNS text
LANGUAGE sql STABLE
RETURN CASE
    WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
    WHEN j.finished_at IS NULL THEN
        CASE WHEN j.started_at IS NOT NULL THEN 'processing'
             WHEN j.run_at > now() THEN 'scheduled'
             ELSE 'pending' END
    WHEN j.failed_chunks > 0 THEN 'partial_failure'
    WHEN j.cancelled_chunks > 0 THEN 'cancelled'
    ELSE 'completed'
END;

-- Columns are appended (run_at, dedupe_key), so the views are replaced in place and whatever
-- depends on them keeps working.
CREATE OR REPLACE VIEW chunkd.sync_jobs AS
SELECT j.public_id AS id, j.kind, j.payload, j.max_concurrency, j.max_attempts, j.priority,
       j.total_chunks, j.cancelled_at, j.created_at, j.started_at, j.finished_at, j.run_at,
       j.dedupe_key
FROM chunkd.jobs j;

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
            CASE WHEN j.started_at IS NOT NULL THEN 'processing'
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

-- As in version 3, plus run_at.
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
        'run_at', s.run_at,
        'chunks_per_second', r.chunks_per_second,
        'eta_seconds', CASE
            WHEN s.pending_chunks + s.processing_chunks = 0 AND NOT j.open THEN 0
            WHEN r.chunks_per_second > 0
            THEN round((s.pending_chunks + s.processing_chunks) / r.chunks_per_second, 1)
        END,
        'open', j.open,
        'total_is_final', j.finished_at IS NOT NULL OR j.cancelled_at IS NOT NULL
                          OR (NOT j.open AND j.appended_chunks = 0),
        'appended_chunks', j.appended_chunks,
        'on_finish_kind', j.on_finish_kind)
    FROM chunkd.chunk_processing_status s
    JOIN chunkd.jobs j ON j.public_id = s.parent_sync_job_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN s.started_at IS NULL THEN NULL
                    ELSE round((s.completed_chunks + s.failed_chunks)::numeric
                               / greatest(extract(epoch FROM
                                   coalesce(s.finished_at, now()) - s.started_at), 0.001), 2)
               END AS chunks_per_second
    ) r
    WHERE s.parent_sync_job_id = get_sync_job_progress.sync_job_id;
END;

-- The dashboard's jobs list (version 4) takes the view's new column and status too. Its table
-- changes, so it is a new function: created beside the old one, grants carried, old dropped.
ALTER FUNCTION chunkd.sync_jobs_page(text, text, int, int) RENAME TO sync_jobs_page_v4;
CREATE FUNCTION chunkd.sync_jobs_page(kind text DEFAULT NULL, status text DEFAULT NULL,
                                      page_size int DEFAULT 50, skip int DEFAULT 0)
RETURNS TABLE (parent_sync_job_id uuid, kind text, total_chunks int, pending_chunks int,
               processing_chunks int, completed_chunks int, failed_chunks int,
               cancelled_chunks int, overall_status text, progress_percentage numeric,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               run_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH page AS (
        SELECT j.id, j.public_id, j.kind, j.total_chunks, j.completed_chunks, j.failed_chunks,
               j.cancelled_chunks, j.created_at, j.started_at, j.finished_at, j.run_at,
               chunkd.overall_status(j) AS overall_status
        FROM chunkd.jobs j
        WHERE (sync_jobs_page.kind IS NULL OR j.kind = sync_jobs_page.kind)
          AND (sync_jobs_page.status IS NULL
               OR chunkd.overall_status(j) = sync_jobs_page.status)
        ORDER BY j.created_at DESC, j.public_id
        LIMIT greatest(sync_jobs_page.page_size, 0) OFFSET greatest(sync_jobs_page.skip, 0)
    ), running AS (
        SELECT a.job_id, count(*)::int AS n
        FROM chunkd.attempts a
        WHERE a.ended_at IS NULL AND a.job_id IN (SELECT p.id FROM page p)
        GROUP BY a.job_id
    )
    SELECT p.public_id, p.kind, p.total_chunks,
           p.total_chunks - p.completed_chunks - p.failed_chunks - p.cancelled_chunks
               - coalesce(r.n, 0),
           coalesce(r.n, 0), p.completed_chunks, p.failed_chunks, p.cancelled_chunks,
           p.overall_status,
           coalesce(round((p.completed_chunks + p.failed_chunks + p.cancelled_chunks) * 100.0
                          / nullif(p.total_chunks, 0), 2), 0),
           p.created_at, p.started_at, p.finished_at, p.run_at
    FROM page p LEFT JOIN running r ON r.job_id = p.id
    ORDER BY p.created_at DESC, p.public_id;
END;
SELECT chunkd.carry_grants('chunkd.sync_jobs_page_v4(text, text, int, int)',
                           'chunkd.sync_jobs_page(text, text, int, int)');
DROP FUNCTION chunkd.sync_jobs_page_v4(text, text, int, int);

CREATE OR REPLACE FUNCTION chunkd.sync_job_status_counts(kind text DEFAULT NULL)
RETURNS TABLE (overall_status text, jobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT chunkd.overall_status(j), count(*)
    FROM chunkd.jobs j
    WHERE sync_job_status_counts.kind IS NULL OR j.kind = sync_job_status_counts.kind
    GROUP BY 1;
END;

-- Nothing is granted to PUBLIC (functions are executable by PUBLIC by default).
REVOKE ALL ON FUNCTION chunkd.carry_grants(regprocedure, regprocedure) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.job_specs(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.misshapen_job_specs(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.invalid_job_spec(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.job_spec_problem(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.create_jobs(jsonb, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION
    chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.create_sync_jobs(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.trigger_run_at_notify() FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.overall_status(chunkd.jobs) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.sync_jobs_page(text, text, int, int) FROM PUBLIC;

-- Whoever could create jobs can create them in bulk, and learn whether a job was created.
SELECT chunkd.carry_grants(
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text)',
    'chunkd.create_sync_jobs(jsonb)');
SELECT chunkd.carry_grants(
    'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int, timestamptz, text, boolean, text)',
    'chunkd.create_jobs(jsonb, boolean)');
