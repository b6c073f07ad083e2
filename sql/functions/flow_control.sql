-- Flow control, enforced by the claim: pausing jobs and kinds, rate limits per kind and per
-- job (token buckets), concurrency limits per key, and what is in effect now.

-- Pending chunks of the unfinished jobs of a kind: its rows of `ready` and `scheduled` (only
-- unfinished, uncancelled jobs have any), in one pass over each. Counting them job by job was
-- a scan of `ready` per job whenever the planner's statistics (a queue once filled by one big
-- job) made it expect a job to have most of the queue; pause_kind holds `ready` in SHARE mode
-- meanwhile, so every claim waits for it.
CREATE OR REPLACE FUNCTION chunkd.pending_of_kind(kind text) RETURNS int
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT ((SELECT count(*) FROM chunkd.ready r WHERE r.kind = pending_of_kind.kind)
            + (SELECT count(*) FROM chunkd.scheduled s WHERE s.kind = pending_of_kind.kind))::int;
END;

-- Is flow control in use for these kinds (NULL: all kinds)? Any unfinished job of them paused,
-- rate-limited, keyed or concurrency-limited (an empty partial index while nobody uses flow
-- control), or any of them paused or rate-limited (an empty table). plpgsql, so its plan is
-- cached for the session; STABLE, so called inside a statement it reads that statement's
-- snapshot.
CREATE OR REPLACE FUNCTION chunkd.flow_in_use(kinds text[]) RETURNS boolean
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

-- The flow controls in effect: every paused or rate-limited kind, every concurrency key with a
-- limit or with unfinished jobs, and every paused unfinished job; with what each has in flight
-- and pending now.
CREATE OR REPLACE FUNCTION chunkd.flow_limits()
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
SET jit = off  -- `chunkd status` reads it; see functions/progress.sql
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

-- Pauses every job of a kind, present and future, as pause_sync_job pauses one, with the same
-- bounded tries: SHARE on `ready` first (claims lock `ready` first, then wait for the rows of
-- rate-limited kinds: a pause holding the kind's row while it waited for `ready` would keep
-- timing out on them), then the kind's row, never waited for while SHARE is held. Returns how
-- many chunks it holds back.
CREATE OR REPLACE FUNCTION chunkd.pause_kind(kind text) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '50ms'
AS $$
#variable_conflict use_variable
DECLARE
    started timestamptz := clock_timestamp();
    tries int := 0;
    try_ms int := 50;
    -- The modes that conflict with SHARE: the claims' and enqueues' ROW EXCLUSIVE and stronger.
    in_the_way CONSTANT text[] := '{RowExclusiveLock,ShareUpdateExclusiveLock,'
                                  'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}';
    held int;
BEGIN
    PERFORM chunkd.check_name('kind', kind);
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', try_ms || 'ms', true);
            LOCK TABLE chunkd.ready IN SHARE MODE;
            -- From here on the fleet waits for this transaction: wait for nothing (a session
            -- holding the kind's row, or inserting it, is no claim: a claim holds `ready`).
            PERFORM set_config('lock_timeout', '1ms', true);
            -- In effect from now, not from the transaction's start (claims may have gone
            -- ahead between tries): as the audit row's time.
            INSERT INTO chunkd.kind_flow AS k (kind, paused_at) VALUES (kind, clock_timestamp())
            ON CONFLICT ON CONSTRAINT kind_flow_pkey DO UPDATE
                SET paused_at = clock_timestamp(), changed_at = now()
                WHERE k.paused_at IS NULL;
            IF FOUND THEN
                INSERT INTO chunkd.events (kind, event, status, attempt, worker_id)
                VALUES (kind, 'paused', 'paused', 0, session_user);
            END IF;
            held := chunkd.pending_of_kind(kind);
            EXIT;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            tries := tries + 1;
            try_ms := chunkd.lock_retry(format('pause of kind %L', kind), started, tries, try_ms,
                                        'chunkd.ready', in_the_way);
        END;
    END LOOP;
    RETURN held;
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.resume_kind(kind text) RETURNS int
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

-- Pauses a job: nothing of it is claimed from the moment this commits. Claims under way finish
-- first: SHARE on `ready` waits for them, and claims that start while it is held wait for this
-- to commit and see the pause. The lock is never waited for long (the fleet's claims and
-- enqueues would queue behind it): the job's row first, then SHARE on `ready`, each try at most
-- 50 ms (up to 200 ms while those in the way come and go: chunkd.lock_retry), and nothing is
-- waited for once SHARE is held; a try that times out is rolled back and tried again after a
-- backoff until chunkd.lock_wait has passed (then lock_not_available, nothing changed). A claim
-- that starts between two tries may still take chunks of the job: it commits before the pause
-- does (the next try waits for it). Chunks in flight finish normally; retries keep their
-- schedule (they wait, due, until resume). Returns how many chunks it holds back (pending now).
-- Pausing a paused job changes nothing.
CREATE OR REPLACE FUNCTION chunkd.pause_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '50ms'
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
    job_cancelled timestamptz;
    started timestamptz := clock_timestamp();
    tries int := 0;
    try_ms int := 50;
    -- The modes that conflict with SHARE: the claims' and enqueues' ROW EXCLUSIVE and stronger.
    in_the_way CONSTANT text[] := '{RowExclusiveLock,ShareUpdateExclusiveLock,'
                                  'ShareRowExclusiveLock,ExclusiveLock,AccessExclusiveLock}';
    held int;
BEGIN
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', try_ms || 'ms', true);
            -- The row first: a session holding it (an append, a retry) keeps only this job's
            -- writers waiting, never the fleet.
            SELECT j.id, j.cancelled_at INTO job, job_cancelled
            FROM chunkd.jobs j WHERE j.public_id = sync_job_id FOR NO KEY UPDATE;
            IF NOT FOUND OR job_cancelled IS NOT NULL THEN
                EXIT;
            END IF;
            LOCK TABLE chunkd.ready IN SHARE MODE;
            -- From here on the fleet waits for this transaction: wait for nothing.
            PERFORM set_config('lock_timeout', '1ms', true);
            -- In effect from now, not from the transaction's start (claims may have gone
            -- ahead between tries): as the audit row's time.
            UPDATE chunkd.jobs j SET paused_at = clock_timestamp()
            WHERE j.id = job AND j.paused_at IS NULL;
            IF FOUND THEN
                INSERT INTO chunkd.events (job_id, event, status, attempt, worker_id)
                VALUES (job, 'paused', 'paused', 0, session_user);
            END IF;
            held := (SELECT count(*) FROM chunkd.ready r WHERE r.job_id = job)
                  + (SELECT count(*) FROM chunkd.scheduled s WHERE s.job_id = job);
            EXIT;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            tries := tries + 1;
            try_ms := chunkd.lock_retry(format('pause of job %s', sync_job_id), started, tries,
                                        try_ms, 'chunkd.ready', in_the_way);
        END;
    END LOOP;
    IF job IS NULL THEN
        -- A finished job whose rows moved to the history holds nothing back.
        IF EXISTS (SELECT 1 FROM chunkd.history_jobs h WHERE h.public_id = sync_job_id) THEN
            RETURN 0;
        END IF;
        RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
    END IF;
    IF job_cancelled IS NOT NULL THEN
        RAISE EXCEPTION 'chunkd: sync job % is cancelled; there is nothing to pause', sync_job_id
            USING ERRCODE = '55000';
    END IF;
    RETURN held;
END;
$$;

-- Resumes a paused job and wakes idle daemons (NOTIFY). Returns how many chunks are pending.
CREATE OR REPLACE FUNCTION chunkd.resume_sync_job(sync_job_id uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job bigint;
BEGIN
    SELECT j.id INTO job FROM chunkd.jobs j WHERE j.public_id = sync_job_id;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM chunkd.history_jobs h WHERE h.public_id = sync_job_id) THEN
            RETURN 0;  -- finished, in the history: nothing pending
        END IF;
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

-- A kind's rate: at most per_second claims per second of its chunks, fleet-wide, and at most
-- burst at once after an idle spell (default: a third of a second's worth, at least 1). per_second
-- NULL removes the limit. A changed limit keeps the tokens the bucket holds (up to the new
-- burst); a new one starts full.
CREATE OR REPLACE FUNCTION chunkd.set_rate_limit(kind text, per_second numeric, burst int DEFAULT NULL)
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
CREATE OR REPLACE FUNCTION chunkd.set_concurrency_limit(key text, max_concurrency int) RETURNS void
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
