-- Recurring schedules: created, paused and dropped by operators; planned and fired by the
-- daemons (each due time once across the fleet).

-- A schedule's next_fire_at is its next due time, or NULL: not planned yet (last_error NULL:
-- the first daemon that sees it plans it), or not plannable (last_error says why: its cron
-- expression has the right shape but the daemons cannot read it; it waits until
-- create_schedule replaces it). Never 'infinity': a CHECK refuses it (migration 12), as in
-- every timestamp column of chunkd, so nothing that reads the schedules gets a sentinel.

-- The earliest planned due time of an active schedule (the daemons' timer), or NULL.
CREATE OR REPLACE FUNCTION chunkd.next_schedule_at() RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT min(s.next_fire_at) FROM chunkd.schedules s WHERE s.paused_at IS NULL;
END;

-- The daemons' side. Schedules to plan (next_fire_at NULL, no error recorded) or fire (due at
-- `at`).
CREATE OR REPLACE FUNCTION chunkd.schedules_due(at timestamptz, max_rows int DEFAULT 100)
RETURNS TABLE (id bigint, name text, cron text, timezone text, next_fire_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT s.id, s.name, s.cron, s.timezone, s.next_fire_at
    FROM chunkd.schedules s
    WHERE s.paused_at IS NULL
      AND ((s.next_fire_at IS NULL AND s.last_error IS NULL)
           OR s.next_fire_at <= schedules_due.at)
    ORDER BY s.next_fire_at NULLS FIRST, s.id
    LIMIT schedules_due.max_rows;
END;

-- Creates a schedule, or replaces the definition of the one with this name (then it is planned
-- again from its new cron and time zone). Returns 'created' or 'updated'. The cron expression
-- is checked for shape here (5 fields, or 6 with seconds); the daemons read it with cronsim.
CREATE OR REPLACE FUNCTION chunkd.create_schedule(
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

CREATE OR REPLACE FUNCTION chunkd.drop_schedule(name text) RETURNS void
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

CREATE OR REPLACE FUNCTION chunkd.pause_schedule(name text) RETURNS void
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
-- (A schedule whose cron could not be read is read again then.)
CREATE OR REPLACE FUNCTION chunkd.resume_schedule(name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE chunkd.schedules s
    SET paused_at = NULL, updated_at = now(),
        next_fire_at = CASE WHEN s.paused_at IS NULL THEN s.next_fire_at END,
        last_error = CASE WHEN s.paused_at IS NULL THEN s.last_error END
    WHERE s.name = resume_schedule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunkd: no schedule named %', quote_literal(resume_schedule.name)
            USING ERRCODE = 'P0002';
    END IF;
END;
$$;

-- Fires a schedule for the due time `due_at` and plans `next_at`, if nobody did it first: the
-- row must still say next_fire_at = due_at (compare-and-set under its row lock; SKIP LOCKED, so
-- a daemon never waits for another's fire) and (schedule, due_at) must be new. Daemons pass as
-- next_at the first due time after their clock, so a schedule that missed several due times
-- fires once. With dedupe, a fire while the schedule's previous job is unfinished creates no
-- job. Returns one row ('fired' or 'deduped', and the job) when this call fired it, else none.
CREATE OR REPLACE FUNCTION chunkd.fire_schedule(
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

-- Plans a schedule's first due time (compare-and-set on NULL), or records why it cannot be
-- planned (error: next_fire_at stays NULL and the schedule is left alone until create_schedule
-- replaces it). False when another daemon planned it, or recorded the error, first.
CREATE OR REPLACE FUNCTION chunkd.plan_schedule(id bigint, next_at timestamptz, error text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE chunkd.schedules s
    SET next_fire_at = CASE WHEN plan_schedule.error IS NULL THEN plan_schedule.next_at END,
        last_error = left(plan_schedule.error, 2000)
    WHERE s.id = plan_schedule.id AND s.next_fire_at IS NULL AND s.last_error IS NULL
      AND s.paused_at IS NULL;
    RETURN FOUND;
END;
$$;
