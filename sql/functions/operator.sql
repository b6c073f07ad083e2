-- Operator actions on a job: cancel, retry its failed chunks, purge finished history.

-- Cancel also closes an open job, and finishes it (announced) even when it has no chunk left
-- to cancel. A finished job, live or in the history, has nothing to cancel: 0.
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
        IF EXISTS (SELECT 1 FROM chunkd.history_jobs h WHERE h.public_id = sync_job_id) THEN
            RETURN 0;
        END IF;
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

-- Failed chunks back to pending, attempts reset. A job whose rows moved to the history (all of
-- them, or some: a big job moving in pieces) is restored to the live tables first, ids kept.
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
    n_failed int;
    r_ids bigint[];
    r_claims int[];
BEGIN
    SELECT j.id, j.cancelled_at, j.kind, j.dedupe_key INTO job, job_cancelled, job_kind, job_key
    FROM chunkd.jobs j WHERE j.public_id = sync_job_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        SELECT h.cancelled_at, h.failed_chunks INTO job_cancelled, n_failed
        FROM chunkd.history_jobs h WHERE h.public_id = sync_job_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'chunkd: no sync job %', sync_job_id USING ERRCODE = 'P0002';
        END IF;
        IF job_cancelled IS NULL AND n_failed = 0 THEN
            RETURN 0;
        END IF;
        IF job_cancelled IS NULL THEN
            PERFORM chunkd.restore_job(sync_job_id);
            SELECT j.id, j.kind, j.dedupe_key INTO job, job_kind, job_key
            FROM chunkd.jobs j WHERE j.public_id = sync_job_id FOR NO KEY UPDATE;
        END IF;
    ELSIF job_cancelled IS NULL
          AND EXISTS (SELECT 1 FROM chunkd.history_moving m WHERE m.job_id = job) THEN
        PERFORM chunkd.restore_job(sync_job_id);
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

-- Deletes jobs (with their chunks, attempts and audit rows) finished before now() - older_than,
-- live or in the history (the one place that deletes from the history: retention drops whole
-- partitions instead).
CREATE OR REPLACE FUNCTION chunkd.purge_finished_jobs(older_than interval) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz;
    doomed bigint[];
    doomed_public uuid[];
    n_history int;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'chunkd: older_than must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    cutoff := now() - chunkd.seconds(chunkd.seconds_of(older_than));
    n_history := chunkd.purge_history(cutoff);
    SELECT array_agg(d.id), array_agg(d.public_id) INTO doomed, doomed_public
    FROM (
        SELECT j.id, j.public_id
        FROM chunkd.jobs j
        WHERE j.finished_at < cutoff
        FOR UPDATE SKIP LOCKED
    ) d;
    IF doomed IS NULL THEN
        RETURN n_history;
    END IF;
    -- A job moving in pieces has some of its chunks in the history already.
    DELETE FROM chunkd.history_attempts a USING chunkd.history_moving m, chunkd.jobs j
    WHERE m.job_id = ANY (doomed) AND j.id = m.job_id
      AND a.sync_job_id = j.public_id AND a.expires_at = m.expires_at;
    DELETE FROM chunkd.history_events e USING chunkd.history_moving m, chunkd.jobs j
    WHERE m.job_id = ANY (doomed) AND j.id = m.job_id
      AND e.sync_job_id = j.public_id AND e.expires_at = m.expires_at;
    DELETE FROM chunkd.history_chunks c USING chunkd.history_moving m, chunkd.jobs j
    WHERE m.job_id = ANY (doomed) AND j.id = m.job_id
      AND c.sync_job_id = j.public_id AND c.expires_at = m.expires_at;
    DELETE FROM chunkd.history_moving m WHERE m.job_id = ANY (doomed);
    DELETE FROM chunkd.attempts a USING chunkd.chunks c
    WHERE c.job_id = ANY (doomed) AND a.chunk_id = c.id;
    DELETE FROM chunkd.legacy_outcomes o USING chunkd.chunks c
    WHERE c.job_id = ANY (doomed) AND o.chunk_id = c.id;
    DELETE FROM chunkd.events e WHERE e.job_id = ANY (doomed);
    DELETE FROM chunkd.events_v1 e WHERE e.sync_job_id = ANY (doomed_public);
    DELETE FROM chunkd.jobs j WHERE j.id = ANY (doomed);  -- chunks go with it (ON DELETE CASCADE)
    RETURN n_history + cardinality(doomed);
END;
$$;
