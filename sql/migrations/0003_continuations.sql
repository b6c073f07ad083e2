-- chunkd schema version 3: jobs that grow as they run, a durable "job finished" event, and
-- recurring schedules.
--
--   continuations  a completion may append chunks to its own job, in the same transaction and
--                  only if the completion is accepted (fenced on worker + attempt), so a stale
--                  worker never adds a page twice; appended chunks take the job's next seq
--                  values, so a max_concurrency = 1 job runs them in order;
--   open jobs      created with open = true, fed by append_chunks(), never finished until
--                  close_sync_job() (or cancel);
--   job_finished   written by the statement that makes a job finished (count_terminal, close,
--                  cancel), under the job's row lock, so exactly once per finish: an audit row
--                  in events, NOTIFY chunkd_job_finished '<job id> <status>', and the optional
--                  on_finish_kind follow-up job, all in the same transaction;
--   schedules      cron schedules fired by the daemons: a fire is a compare-and-set of the
--                  schedule's next_fire_at under its row lock plus a unique (schedule, due time)
--                  row, so however many daemons race, each due time fires once.

SET LOCAL lock_timeout = '60s';

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------

ALTER TABLE chunkd.jobs
    -- An open job takes chunks from append_chunks() and is never finished until closed.
    ADD COLUMN open boolean NOT NULL DEFAULT false,
    -- Kind of the one-chunk job created when this job finishes (NULL: none).
    ADD COLUMN on_finish_kind text CHECK (length(on_finish_kind) BETWEEN 1 AND 200),
    -- Chunks appended by completions (continuations): while a job has some and is not finished,
    -- any running chunk may append more, so its total is not final.
    ADD COLUMN appended_chunks int NOT NULL DEFAULT 0;
-- An open job may have no chunk yet.
ALTER TABLE chunkd.jobs DROP CONSTRAINT jobs_total_chunks_check;
ALTER TABLE chunkd.jobs ADD CONSTRAINT jobs_total_chunks_check CHECK (total_chunks >= 0);

-- Job-level audit rows (chunk_id NULL): job_finished, with the final counts in detail.
ALTER TABLE chunkd.events DROP CONSTRAINT events_event_check;
ALTER TABLE chunkd.events ADD CONSTRAINT events_event_check
    CHECK (event IN ('cancelled', 'retried', 'job_finished'));
ALTER TABLE chunkd.events ADD COLUMN detail jsonb;

CREATE TABLE chunkd.schedules (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    cron            text NOT NULL,
    timezone        text NOT NULL DEFAULT 'UTC',
    kind            text NOT NULL CHECK (length(kind) BETWEEN 1 AND 200),
    chunks          jsonb NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    dedupe          boolean NOT NULL DEFAULT true,
    max_concurrency int CHECK (max_concurrency IS NULL OR max_concurrency >= 1),
    max_attempts    int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    priority        int NOT NULL DEFAULT 0,
    paused_at       timestamptz,
    -- The next due time, computed by a daemon from cron and timezone (NULL: not planned yet).
    next_fire_at    timestamptz,
    last_fired_at   timestamptz,
    last_job_id     bigint,
    -- Why a daemon could not plan it (e.g. a cron expression it cannot read).
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_next ON chunkd.schedules (next_fire_at) WHERE paused_at IS NULL;

-- One row per due time that fired: the primary key is what makes a fire happen once.
CREATE TABLE chunkd.schedule_fires (
    schedule_id bigint NOT NULL REFERENCES chunkd.schedules (id) ON DELETE CASCADE,
    due_at      timestamptz NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    worker_id   text NOT NULL,
    sync_job_id uuid,
    -- The schedule's previous job was still unfinished: no new job (dedupe).
    deduped     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (schedule_id, due_at)
);

-- ---------------------------------------------------------------------------------------------
-- Growing jobs
-- ---------------------------------------------------------------------------------------------

-- Checks a JSON array of chunk payloads against the enqueue limits; returns how many.
CREATE FUNCTION chunkd.check_chunks(chunks jsonb, allow_empty boolean) RETURNS int
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

-- Appends chunks to a job: they take its next seq values and join the ready queue (one
-- statement: one NOTIFY). Locks the job row; callers that end attempts do so first.
CREATE FUNCTION chunkd.add_chunks(job bigint, chunks jsonb, continued boolean) RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    j record;
    n int := jsonb_array_length(chunks);
BEGIN
    SELECT x.total_chunks, x.kind, x.priority, x.max_concurrency IS NOT NULL AS limited INTO j
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

-- What a finished job tells the world, once per finish, in the finishing transaction: the
-- job_finished audit row, NOTIFY chunkd_job_finished '<job id> <status>', and the on_finish
-- follow-up job (one chunk whose payload is the finished job's id, status and counts).
CREATE FUNCTION chunkd.announce_finished(job_ids bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record;
    info jsonb;
    follow_id bigint;
    follow_public uuid;
BEGIN
    FOR f IN
        SELECT j.*,
               CASE WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
                    WHEN j.failed_chunks > 0 THEN 'partial_failure'
                    WHEN j.cancelled_chunks > 0 THEN 'cancelled'
                    ELSE 'completed' END AS status
        FROM chunkd.jobs j WHERE j.id = ANY (job_ids) ORDER BY j.id
    LOOP
        info := jsonb_build_object(
            'sync_job_id', f.public_id, 'kind', f.kind, 'overall_status', f.status,
            'total_chunks', f.total_chunks, 'completed_chunks', f.completed_chunks,
            'failed_chunks', f.failed_chunks, 'cancelled_chunks', f.cancelled_chunks,
            'finished_at', f.finished_at);
        follow_public := NULL;
        IF f.on_finish_kind IS NOT NULL THEN
            INSERT INTO chunkd.jobs (kind, payload, max_attempts, priority, total_chunks)
            VALUES (f.on_finish_kind, f.payload, f.max_attempts, f.priority, 1)
            RETURNING id, public_id INTO follow_id, follow_public;
            WITH c AS (
                INSERT INTO chunkd.chunks (job_id, seq, payload) VALUES (follow_id, 0, info)
                RETURNING id
            )
            INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited)
            SELECT c.id, follow_id, 0, f.priority, f.on_finish_kind, false FROM c;
        END IF;
        INSERT INTO chunkd.events (job_id, event, status, attempt, detail)
        VALUES (f.id, 'job_finished', f.status, 0,
                info || jsonb_build_object('on_finish_job_id', follow_public));
        PERFORM pg_notify('chunkd_job_finished', f.public_id::text || ' ' || f.status);
    END LOOP;
END;
$$;

-- As in version 2, plus: an open job is never finished, and the jobs this call finishes are
-- announced. "Finished by this call" = finished now, and short of its total before this call's
-- counts (a finished job always has all its chunks terminal).
CREATE OR REPLACE FUNCTION chunkd.count_terminal(job_ids bigint[], completed int[], failed int[],
                                                 cancelled int[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    finished bigint[];
BEGIN
    IF cardinality(job_ids) > 1 THEN
        PERFORM 1 FROM chunkd.jobs j WHERE j.id = ANY (job_ids) ORDER BY j.id
        FOR NO KEY UPDATE;
    END IF;
    WITH u AS (
        UPDATE chunkd.jobs j
        SET completed_chunks = j.completed_chunks + d.completed,
            failed_chunks = j.failed_chunks + d.failed,
            cancelled_chunks = j.cancelled_chunks + d.cancelled,
            finished_at = CASE
                WHEN j.finished_at IS NULL AND NOT j.open
                     AND j.completed_chunks + j.failed_chunks + j.cancelled_chunks
                         + d.completed + d.failed + d.cancelled >= j.total_chunks
                THEN now() ELSE j.finished_at END
        FROM unnest(job_ids, completed, failed, cancelled)
             AS d(job_id, completed, failed, cancelled)
        WHERE j.id = d.job_id
        RETURNING j.id, j.finished_at IS NOT NULL
                  AND j.completed_chunks + j.failed_chunks + j.cancelled_chunks
                      - d.completed - d.failed - d.cancelled < j.total_chunks AS just_finished
    )
    SELECT array_agg(u.id ORDER BY u.id) FILTER (WHERE u.just_finished) INTO finished FROM u;
    IF finished IS NOT NULL THEN
        PERFORM chunkd.announce_finished(finished);
    END IF;
END;
$$;

-- The daemon's completion of one chunk that appends chunks to its job (a continuation), by
-- internal id. Fenced like complete_attempts: NULL when the caller no longer holds the attempt,
-- and then nothing is appended; otherwise how many chunks were appended. The job's total grows
-- before the completion is counted, so the job cannot finish in between.
CREATE FUNCTION chunkd.complete_and_append(
    worker_id text,
    id bigint,
    attempt int,
    result jsonb,
    chunks jsonb
) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n int := chunkd.check_chunks(complete_and_append.chunks, true);
    job bigint;
BEGIN
    UPDATE chunkd.attempts a
    SET ended_at = now(), outcome = 'completed', final = true,
        result = complete_and_append.result
    WHERE a.chunk_id = complete_and_append.id AND a.attempt = complete_and_append.attempt
      AND a.worker_id = complete_and_append.worker_id AND a.outcome IS NULL
    RETURNING a.job_id INTO job;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF n > 0 THEN
        PERFORM chunkd.add_chunks(job, complete_and_append.chunks, true);
    END IF;
    PERFORM chunkd.count_terminal(ARRAY[job], ARRAY[1], ARRAY[0], ARRAY[0]);
    RETURN n;
END;
$$;

-- The same by public queue id, for workers written in other languages.
CREATE FUNCTION chunkd.complete_chunk_and_append(
    queue_id uuid,
    worker_id text,
    attempt int,
    result jsonb,
    chunks jsonb
) RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT chunkd.complete_and_append(
        complete_chunk_and_append.worker_id, c.id, complete_chunk_and_append.attempt,
        complete_chunk_and_append.result, complete_chunk_and_append.chunks)
    FROM chunkd.chunks c WHERE c.queue_id = complete_chunk_and_append.queue_id;
END;

-- A producer feeds an open job; returns how many chunks were appended.
CREATE FUNCTION chunkd.append_chunks(job uuid, chunks jsonb) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n int := chunkd.check_chunks(append_chunks.chunks, false);
    j record;
BEGIN
    SELECT x.id, x.open, x.cancelled_at INTO j
    FROM chunkd.jobs x WHERE x.public_id = append_chunks.job FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', append_chunks.job USING ERRCODE = 'P0002';
    END IF;
    IF j.cancelled_at IS NOT NULL THEN
        RAISE EXCEPTION 'chunkd: sync job % is cancelled; chunks cannot be appended',
            append_chunks.job USING ERRCODE = '55000';
    END IF;
    IF NOT j.open THEN
        RAISE EXCEPTION 'chunkd: sync job % is closed (or was not created open); chunks cannot '
            'be appended', append_chunks.job USING ERRCODE = '55000';
    END IF;
    PERFORM chunkd.add_chunks(j.id, append_chunks.chunks, false);
    RETURN n;
END;
$$;

-- Closes an open job: no more appends; it finishes now if all its chunks are terminal, or
-- when its last chunk is. true if it was open, false if already closed (closing is idempotent).
CREATE FUNCTION chunkd.close_sync_job(job uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j record;
    finished boolean;
BEGIN
    SELECT x.id, x.open INTO j
    FROM chunkd.jobs x WHERE x.public_id = close_sync_job.job FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no sync job %', close_sync_job.job USING ERRCODE = 'P0002';
    END IF;
    IF NOT j.open THEN
        RETURN false;
    END IF;
    UPDATE chunkd.jobs x
    SET open = false,
        finished_at = CASE
            WHEN x.completed_chunks + x.failed_chunks + x.cancelled_chunks >= x.total_chunks
            THEN now() END
    WHERE x.id = j.id
    RETURNING x.finished_at IS NOT NULL INTO finished;
    IF finished THEN
        PERFORM chunkd.announce_finished(ARRAY[j.id]);
    END IF;
    RETURN true;
END;
$$;

-- create_sync_job gains open and on_finish_kind. A new argument list is a new function, so
-- the old one is dropped and the grants operators gave on it are carried over.
CREATE TEMP TABLE chunkd_carried_grants ON COMMIT DROP AS
SELECT DISTINCT r.rolname
FROM pg_catalog.pg_proc f
CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
WHERE f.oid = 'chunkd.create_sync_job(text, jsonb, jsonb, int, int, int)'::regprocedure
  AND acl.privilege_type = 'EXECUTE' AND acl.grantee <> f.proowner;

DROP FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, int, int);

CREATE FUNCTION chunkd.create_sync_job(
    kind text,
    chunks jsonb,
    payload jsonb DEFAULT '{}',
    max_concurrency int DEFAULT NULL,
    max_attempts int DEFAULT 3,
    priority int DEFAULT 0,
    open boolean DEFAULT false,
    on_finish_kind text DEFAULT NULL
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
    IF on_finish_kind IS NOT NULL AND (length(on_finish_kind) = 0 OR length(on_finish_kind) > 200)
    THEN
        RAISE EXCEPTION 'chunkd: on_finish_kind must be NULL or a non-empty text of at most 200 '
            'characters' USING ERRCODE = '22023';
    END IF;
    -- An open job may start empty: its producer appends the chunks.
    n := chunkd.check_chunks(chunks, coalesce(open, false));
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
    IF pg_column_size(payload) > 1024 * 1024 THEN
        RAISE EXCEPTION 'chunkd: job payload is % bytes, above the limit of 1 MiB',
            pg_column_size(payload) USING ERRCODE = '54000';
    END IF;

    INSERT INTO chunkd.jobs (kind, payload, max_concurrency, max_attempts, priority, total_chunks,
                             open, on_finish_kind)
    VALUES (kind, coalesce(payload, '{}'), max_concurrency, max_attempts,
            coalesce(priority, 0), n, coalesce(open, false), on_finish_kind)
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

DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN SELECT rolname FROM pg_temp.chunkd_carried_grants LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION chunkd.create_sync_job(text, jsonb, jsonb, int, '
                       'int, int, boolean, text) TO %I', grantee);
    END LOOP;
END;
$$;

-- Cancel also closes an open job, and finishes it (announced) even when it has no chunk left
-- to cancel.
CREATE OR REPLACE FUNCTION chunkd.cancel_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    job_open boolean;
    n_pending int;
    n_running int;
BEGIN
    SELECT j.id, j.open INTO job, job_open FROM chunkd.jobs j WHERE j.public_id = sync_job_id;
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
        UPDATE chunkd.jobs j SET cancelled_at = coalesce(j.cancelled_at, now()), open = false
        WHERE j.id = job;
        PERFORM chunkd.count_terminal(ARRAY[job], ARRAY[0], ARRAY[0],
                                      ARRAY[n_pending + n_running]);
    ELSIF job_open THEN
        UPDATE chunkd.jobs j
        SET cancelled_at = coalesce(j.cancelled_at, now()), open = false,
            finished_at = CASE
                WHEN j.completed_chunks + j.failed_chunks + j.cancelled_chunks >= j.total_chunks
                THEN now() END
        WHERE j.id = job AND j.open;
        IF FOUND THEN
            PERFORM chunkd.announce_finished(ARRAY[job]);
        END IF;
    END IF;
    RETURN n_pending + n_running;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Monitoring
-- ---------------------------------------------------------------------------------------------

-- As in version 2; an open job may have no chunk yet (0 %).
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
            CASE WHEN j.started_at IS NULL THEN 'pending' ELSE 'processing' END
        WHEN j.failed_chunks > 0 THEN 'partial_failure'
        WHEN j.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END AS overall_status,
    coalesce(round((j.completed_chunks + j.failed_chunks + j.cancelled_chunks) * 100.0
                   / nullif(j.total_chunks, 0), 2), 0) AS progress_percentage,
    j.created_at,
    j.started_at,
    j.finished_at
FROM chunkd.jobs j
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = j.id)
           + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = j.id) AS pending
) c;

-- total_is_final: false while the job is open, or while it grows by continuations and is not
-- finished (any running chunk may append more); eta_seconds then covers the chunks known so far.
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

-- The seed's per-chunk audit trail stays per chunk; job-level rows have their own view.
CREATE OR REPLACE VIEW chunkd.chunk_events AS
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
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id JOIN chunkd.chunks c ON c.id = e.chunk_id
UNION ALL
SELECT v.queue_id, v.sync_job_id, v.event, v.status, v.attempt, v.worker_id, v.error, v.at
FROM chunkd.events_v1 v;

CREATE VIEW chunkd.job_events AS
SELECT j.public_id AS sync_job_id, e.event, e.status, e.detail, e.at
FROM chunkd.events e JOIN chunkd.jobs j ON j.id = e.job_id
WHERE e.chunk_id IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Schedules
-- ---------------------------------------------------------------------------------------------

-- Creates a schedule, or replaces the definition of the one with this name (then it is planned
-- again from its new cron and time zone). Returns 'created' or 'updated'. The cron expression
-- is checked for shape here (5 fields, or 6 with seconds); the daemons read it with cronsim.
CREATE FUNCTION chunkd.create_schedule(
    name text,
    cron text,
    kind text,
    chunks jsonb,
    payload jsonb DEFAULT '{}',
    timezone text DEFAULT 'UTC',
    dedupe boolean DEFAULT true,
    max_concurrency int DEFAULT NULL,
    max_attempts int DEFAULT 3,
    priority int DEFAULT 0
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    inserted boolean;
BEGIN
    IF name IS NULL OR length(name) = 0 OR length(name) > 200 THEN
        RAISE EXCEPTION 'chunkd: schedule name must be a non-empty text of at most 200 '
            'characters' USING ERRCODE = '22023';
    END IF;
    IF cron IS NULL OR cron !~ '^\s*[0-9A-Za-z*/,?#-]+(\s+[0-9A-Za-z*/,?#-]+){4,5}\s*$' THEN
        RAISE EXCEPTION 'chunkd: % is not a cron expression (5 fields: minute hour day month '
            'weekday, e.g. ''*/15 * * * *'')', coalesce(quote_literal(cron), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF timezone IS NULL
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names t WHERE t.name = timezone) THEN
        RAISE EXCEPTION 'chunkd: % is not a time zone name (e.g. UTC, Europe/Berlin)',
            coalesce(quote_literal(timezone), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF kind IS NULL OR length(kind) = 0 OR length(kind) > 200 THEN
        RAISE EXCEPTION 'chunkd: kind must be a non-empty text of at most 200 characters'
            USING ERRCODE = '22023';
    END IF;
    PERFORM chunkd.check_chunks(chunks, false);
    IF max_concurrency IS NOT NULL AND max_concurrency < 1 THEN
        RAISE EXCEPTION 'chunkd: max_concurrency must be NULL (unlimited) or >= 1, got %',
            max_concurrency USING ERRCODE = '22023';
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'chunkd: max_attempts must be >= 1, got %', max_attempts
            USING ERRCODE = '22023';
    END IF;
    IF pg_column_size(payload) > 1024 * 1024 THEN
        RAISE EXCEPTION 'chunkd: job payload is % bytes, above the limit of 1 MiB',
            pg_column_size(payload) USING ERRCODE = '54000';
    END IF;
    INSERT INTO chunkd.schedules AS s (name, cron, timezone, kind, chunks, payload, dedupe,
                                      max_concurrency, max_attempts, priority)
    VALUES (name, btrim(cron), timezone, kind, chunks, coalesce(payload, '{}'),
            coalesce(dedupe, true), max_concurrency, max_attempts, coalesce(priority, 0))
    ON CONFLICT ON CONSTRAINT schedules_name_key DO UPDATE
    SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, kind = EXCLUDED.kind,
        chunks = EXCLUDED.chunks, payload = EXCLUDED.payload, dedupe = EXCLUDED.dedupe,
        max_concurrency = EXCLUDED.max_concurrency, max_attempts = EXCLUDED.max_attempts,
        priority = EXCLUDED.priority, updated_at = now(), last_error = NULL,
        next_fire_at = CASE WHEN s.cron = EXCLUDED.cron AND s.timezone = EXCLUDED.timezone
                            THEN s.next_fire_at END
    RETURNING (xmax = 0) INTO inserted;
    RETURN CASE WHEN inserted THEN 'created' ELSE 'updated' END;
END;
$$;

CREATE FUNCTION chunkd.drop_schedule(name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM chunkd.schedules s WHERE s.name = drop_schedule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no schedule named %', quote_literal(drop_schedule.name)
            USING ERRCODE = 'P0002';
    END IF;
END;
$$;

CREATE FUNCTION chunkd.pause_schedule(name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE chunkd.schedules s SET paused_at = coalesce(s.paused_at, now()), updated_at = now()
    WHERE s.name = pause_schedule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no schedule named %', quote_literal(pause_schedule.name)
            USING ERRCODE = 'P0002';
    END IF;
END;
$$;

-- Resuming plans the schedule again from now: the due times it missed while paused do not fire.
CREATE FUNCTION chunkd.resume_schedule(name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE chunkd.schedules s
    SET paused_at = NULL, updated_at = now(),
        next_fire_at = CASE WHEN s.paused_at IS NULL THEN s.next_fire_at END
    WHERE s.name = resume_schedule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no schedule named %', quote_literal(resume_schedule.name)
            USING ERRCODE = 'P0002';
    END IF;
END;
$$;

-- The daemons' side. Schedules to plan (next_fire_at NULL) or fire (due at `at`).
CREATE FUNCTION chunkd.schedules_due(at timestamptz, max_rows int DEFAULT 100)
RETURNS TABLE (id bigint, name text, cron text, timezone text, next_fire_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT s.id, s.name, s.cron, s.timezone, s.next_fire_at
    FROM chunkd.schedules s
    WHERE s.paused_at IS NULL
      AND (s.next_fire_at IS NULL OR s.next_fire_at <= schedules_due.at)
    ORDER BY s.next_fire_at NULLS FIRST, s.id
    LIMIT schedules_due.max_rows;
END;

-- The earliest planned due time of an active schedule (the daemons' timer), or NULL.
CREATE FUNCTION chunkd.next_schedule_at() RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT min(s.next_fire_at) FROM chunkd.schedules s WHERE s.paused_at IS NULL;
END;

-- Plans a schedule's first due time (compare-and-set on NULL), or records why it cannot be
-- planned (error: it is then left alone until create_schedule replaces it).
CREATE FUNCTION chunkd.plan_schedule(id bigint, next_at timestamptz, error text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE chunkd.schedules s
    SET next_fire_at = CASE WHEN plan_schedule.error IS NULL THEN plan_schedule.next_at
                            ELSE 'infinity' END,
        last_error = left(plan_schedule.error, 2000)
    WHERE s.id = plan_schedule.id AND s.next_fire_at IS NULL AND s.paused_at IS NULL;
    RETURN FOUND;
END;
$$;

-- Fires a schedule for the due time `due_at` and plans `next_at`, if nobody did it first: the
-- row must still say next_fire_at = due_at (compare-and-set under its row lock; SKIP LOCKED, so
-- a daemon never waits for another's fire) and (schedule, due_at) must be new. Daemons pass as
-- next_at the first due time after their clock, so a schedule that missed several due times
-- fires once. With dedupe, a fire while the schedule's previous job is unfinished creates no
-- job. Returns one row ('fired' or 'deduped', and the job) when this call fired it, else none.
CREATE FUNCTION chunkd.fire_schedule(
    id bigint,
    due_at timestamptz,
    next_at timestamptz,
    worker_id text
) RETURNS TABLE (outcome text, sync_job_id uuid)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    s record;
    job_public uuid;
    job_internal bigint;
    result text;
BEGIN
    IF next_at IS NULL OR due_at IS NULL OR next_at <= due_at THEN
        RAISE EXCEPTION 'chunkd: next_at must be after due_at' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO s FROM chunkd.schedules x
    WHERE x.id = fire_schedule.id AND x.paused_at IS NULL AND x.next_fire_at = due_at
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO chunkd.schedule_fires (schedule_id, due_at, worker_id)
    VALUES (s.id, due_at, worker_id)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN  -- fired before (a schedule re-planned onto an old due time)
        UPDATE chunkd.schedules x SET next_fire_at = next_at WHERE x.id = s.id;
        RETURN;
    END IF;
    SELECT j.public_id INTO job_public FROM chunkd.jobs j
    WHERE s.dedupe AND j.id = s.last_job_id AND j.finished_at IS NULL AND j.cancelled_at IS NULL;
    IF FOUND THEN
        result := 'deduped';
        job_internal := s.last_job_id;
    ELSE
        result := 'fired';
        job_public := chunkd.create_sync_job(s.kind, s.chunks, s.payload, s.max_concurrency,
                                             s.max_attempts, s.priority);
        SELECT j.id INTO job_internal FROM chunkd.jobs j WHERE j.public_id = job_public;
    END IF;
    UPDATE chunkd.schedule_fires f SET sync_job_id = job_public, deduped = result = 'deduped'
    WHERE f.schedule_id = s.id AND f.due_at = fire_schedule.due_at;
    UPDATE chunkd.schedules x
    SET next_fire_at = next_at, last_fired_at = now(), last_job_id = job_internal
    WHERE x.id = s.id;
    outcome := result;
    sync_job_id := job_public;
    RETURN NEXT;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkd FROM PUBLIC;

-- Roles that can run the daemon (they may complete chunks) can run this version's daemon: they
-- get the new functions it calls.
DO $$
DECLARE
    grantee text;
    fn text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT r.rolname
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
        JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
        WHERE f.oid = 'chunkd.complete_attempts(text, bigint[], int[], jsonb[])'::regprocedure
          AND acl.privilege_type = 'EXECUTE' AND acl.grantee <> f.proowner
    LOOP
        FOREACH fn IN ARRAY ARRAY[
            'chunkd.complete_and_append(text, bigint, int, jsonb, jsonb)',
            'chunkd.schedules_due(timestamptz, int)',
            'chunkd.next_schedule_at()',
            'chunkd.plan_schedule(bigint, timestamptz, text)',
            'chunkd.fire_schedule(bigint, timestamptz, timestamptz, text)']
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, grantee);
        END LOOP;
    END LOOP;
END;
$$;
