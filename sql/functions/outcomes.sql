-- Outcomes: completions (in batches, or one with appended chunks), failures with retries and
-- backoff; every one fenced on (chunk, attempt, worker, attempt still open).

-- The daemon's batch completion, by internal id; returns the ids whose completion was accepted.
-- Fenced on (chunk, attempt, worker, still open). SET enable_seqscan = off: the attempts table
-- was analyzed when nearly empty, and a stale estimate must never turn a batch into a scan or
-- an O(batch^2) join (design study, "pitfalls"); array_position keeps it one primary-key scan.
CREATE OR REPLACE FUNCTION chunkd.complete_attempts(
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

-- The daemon's completion of one chunk that appends chunks to its job (a continuation), by
-- internal id. Fenced like complete_attempts: NULL when the caller no longer holds the attempt,
-- and then nothing is appended; otherwise how many chunks were appended. The job's total grows
-- before the completion is counted, so the job cannot finish in between.
CREATE OR REPLACE FUNCTION chunkd.complete_and_append(
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

-- The batch form by public queue id (chunkd 0.1's daemon called it; kept for it and for
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

-- The same by public queue id, for workers written in other languages.
CREATE OR REPLACE FUNCTION chunkd.complete_chunk_and_append(
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

-- The daemon's failure report, by internal id. Returns the chunk's new status ('pending' =
-- retry scheduled, 'failed'), or NULL when fenced out. retry_in_s overrides the backoff (what a
-- RetryLater did before chunkd 0.3, and fail_chunk_job_safe's retry_in: a retry at that time,
-- spending the attempt, never a snooze); base_s and cap_s tune it. A scheduled retry records
-- its delay (attempts.delay_s: the audit trail shows it).
CREATE OR REPLACE FUNCTION chunkd.fail_attempt(
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
    -- The fence below holds the attempt to this number: its backoff is known before.
    delay float8 := coalesce(fail_attempt.retry_in_s,
                             chunkd.backoff_s(fail_attempt.attempt, fail_attempt.base_s,
                                              fail_attempt.cap_s));
    ended record;
BEGIN
    UPDATE chunkd.attempts a
    SET ended_at = now(), error = chunkd.clip_error(fail_attempt.error),
        outcome = CASE WHEN coalesce(fail_attempt.retryable, true) AND a.attempt < j.max_attempts
                       THEN 'retry_scheduled' ELSE 'failed' END,
        final = NOT (coalesce(fail_attempt.retryable, true) AND a.attempt < j.max_attempts),
        delay_s = CASE WHEN coalesce(fail_attempt.retryable, true) AND a.attempt < j.max_attempts
                       THEN delay END
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
    PERFORM chunkd.requeue(ARRAY[ended.chunk_id], ARRAY[ended.n], ARRAY[ended.attempt],
                           ARRAY[delay]);
    RETURN 'pending';
END;
$$;

-- The daemon's snooze (a handler's RetryLater; the http: handler's Retry-After), by internal
-- id: the claim ends as 'snoozed' and the chunk runs again in delay_s seconds WITHOUT spending
-- the attempt, as a release does (the claim number grows, the attempt number does not), so a
-- rate-limited chunk is not failed by polite 429s. The reason and the delay are kept in the
-- attempts row (the audit trail shows both). Bounded: once the chunk has been snoozed
-- max_snoozes times, a further RetryLater counts as a failed attempt retried after delay_s
-- ('retry_scheduled', or 'failed' on the last attempt), with the limit named in its error. An
-- operator's retry of a failed chunk starts the count again, as it starts its attempts again
-- (snoozes are counted after the chunk's last final attempt).
-- Returns 'snoozed', 'pending' (retry scheduled, attempt spent), 'failed', or NULL when fenced
-- out.
--
-- The fence: (chunk, attempt, worker, still open) like every outcome, and the claim itself.
-- The chunk comes back with the same attempt number, so the same worker may hold it again with
-- the same (chunk, attempt, worker); a report of the earlier claim sent again (its reply was
-- lost, the retry went out after the chunk was claimed anew) must not end the new claim.
-- claimed_until and lease_s are the claim's lease_expires_at as the claim returned it and the
-- lease it asked for: claimed_until - lease_s is the claim's transaction start, at or before
-- its attempts row's claimed_at, and after the claimed_at of every earlier claim of the chunk.
-- An ended claim of this chunk claimed at or after it means the report is that claim's: NULL.
-- (NULL claimed_until: no such check, the fence of the other outcomes only.)
-- carry grants: chunkd.fail_attempt(text,bigint,integer,text,boolean,double precision,double precision,double precision) -> chunkd.snooze_attempt(text,bigint,integer,text,double precision,integer,timestamp with time zone,double precision)
CREATE OR REPLACE FUNCTION chunkd.snooze_attempt(
    worker_id text,
    id bigint,
    attempt int,
    reason text,
    delay_s float8,
    max_snoozes int,
    claimed_until timestamptz,
    lease_s float8
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    claim_start timestamptz := snooze_attempt.claimed_until
                               - chunkd.seconds(snooze_attempt.lease_s);
    snoozes int;
    stale boolean;
    snooze boolean;
    ended record;
BEGIN
    IF snooze_attempt.delay_s IS NULL OR snooze_attempt.delay_s < 0
       OR snooze_attempt.delay_s IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'chunkd: a snooze needs a finite delay of 0 seconds or more, got %',
            coalesce(snooze_attempt.delay_s::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF snooze_attempt.max_snoozes IS NULL OR snooze_attempt.max_snoozes < 0 THEN
        RAISE EXCEPTION 'chunkd: max_snoozes must be >= 0, got %',
            coalesce(snooze_attempt.max_snoozes::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    -- The chunk's claims so far: a few rows, by primary key.
    SELECT count(*) FILTER (WHERE p.outcome = 'snoozed' AND p.n > coalesce(
               (SELECT max(f.n) FROM chunkd.attempts f
                WHERE f.chunk_id = snooze_attempt.id AND f.final), 0)),
           coalesce(bool_or(p.ended_at IS NOT NULL AND p.claimed_at >= claim_start), false)
    INTO snoozes, stale
    FROM chunkd.attempts p
    WHERE p.chunk_id = snooze_attempt.id;
    IF stale THEN
        RETURN NULL;
    END IF;
    snooze := snoozes < snooze_attempt.max_snoozes;
    UPDATE chunkd.attempts a
    SET ended_at = now(),
        outcome = CASE WHEN snooze THEN 'snoozed'
                       WHEN a.attempt < j.max_attempts THEN 'retry_scheduled'
                       ELSE 'failed' END,
        final = NOT snooze AND a.attempt >= j.max_attempts,
        error = chunkd.clip_error(CASE WHEN snooze THEN snooze_attempt.reason
            ELSE format('snooze limit (%s) reached, counted as an attempt: %s',
                        snooze_attempt.max_snoozes, snooze_attempt.reason) END),
        delay_s = CASE WHEN snooze OR a.attempt < j.max_attempts THEN snooze_attempt.delay_s END
    FROM chunkd.jobs j
    WHERE a.chunk_id = snooze_attempt.id AND a.attempt = snooze_attempt.attempt
      AND a.worker_id = snooze_attempt.worker_id AND a.outcome IS NULL AND j.id = a.job_id
    RETURNING a.chunk_id, a.n, a.attempt, a.job_id, a.final INTO ended;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF ended.final THEN
        PERFORM chunkd.count_terminal(ARRAY[ended.job_id], ARRAY[0], ARRAY[1], ARRAY[0]);
        RETURN 'failed';
    END IF;
    PERFORM chunkd.requeue(
        ARRAY[ended.chunk_id], ARRAY[ended.n],
        ARRAY[CASE WHEN snooze THEN ended.attempt - 1 ELSE ended.attempt END],
        ARRAY[snooze_attempt.delay_s]);
    RETURN CASE WHEN snooze THEN 'snoozed' ELSE 'pending' END;
END;
$$;

-- The public failure report (the seed's name), by queue id, with intervals. retry_in schedules
-- the retry at that time and spends the attempt, as it always did: it is not a snooze.
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
