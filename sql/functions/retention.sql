-- Retention: the policies, and the daemons' maintenance round that moves finished jobs out of
-- the live tables into the history (tables partitioned by when their rows expire, schema
-- version 16) and drops the partitions whose range is past. An operator's retry brings a job
-- back (restore_job). docs/storage.md, "Retention and history".

-- The policies: how long a finished job is kept, per terminal state (partial_failure jobs are
-- 'failed'), as an interval and in seconds, and when each was last changed.
CREATE OR REPLACE FUNCTION chunkd.retention_policies()
RETURNS TABLE (state text, keep interval, keep_s float8, changed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT r.state, justify_hours(chunkd.seconds(r.keep_s)), r.keep_s, r.changed_at
    FROM chunkd.retention r
    ORDER BY array_position(ARRAY['completed', 'failed', 'cancelled'], r.state);
END;

-- Sets how long finished jobs of one state are kept: completed, failed (a job with a chunk that
-- failed for good: overall_status partial_failure) or cancelled; at least 1 second. A job's
-- rows are kept until its finished_at plus the policy in force when it moved to the history
-- (seconds after it finished, with a daemon running): a changed policy applies to jobs that
-- finish afterwards. '1 day' is 86,400 seconds whatever the TimeZone.
CREATE OR REPLACE FUNCTION chunkd.set_retention(state text, keep interval) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    s text := lower(set_retention.state);
    secs float8 := chunkd.seconds_of(set_retention.keep);
BEGIN
    IF s = 'partial_failure' THEN
        s := 'failed';
    END IF;
    IF s IS NULL OR s NOT IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'chunkd: no retention state %: completed, failed or cancelled',
            coalesce(quote_literal(set_retention.state), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF secs IS NULL OR secs < 1 OR secs > 3153600000 THEN
        RAISE EXCEPTION 'chunkd: a retention must be between 1 second and 36500 days, got %',
            coalesce(set_retention.keep::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    UPDATE chunkd.retention r SET keep_s = secs, changed_at = now()
    WHERE r.state = s;
END;
$$;

-- The width of new history partitions, in whole seconds: a quarter of the shortest policy,
-- between 1 second and 1 day, and at least a sixtieth of the longest policy (so about 60
-- partitions per table at most). A job is removed at most one width after it expired.
CREATE OR REPLACE FUNCTION chunkd.history_width_s() RETURNS float8
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT ceil(greatest(least(greatest(min(r.keep_s) / 4, 1), 86400), max(r.keep_s) / 60))
    FROM chunkd.retention r;
END;

-- A finished job's overall status (what overall_status() gives once finished_at is set), from
-- the three columns it reads: a plain expression, inlined where it is used (overall_status()
-- holds a subquery, so it is called, 5 us a row).
CREATE OR REPLACE FUNCTION chunkd.final_status(cancelled_at timestamptz, failed_chunks int,
                                               cancelled_chunks int)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN cancelled_at IS NOT NULL THEN 'cancelled'
            WHEN failed_chunks > 0 THEN 'partial_failure'
            WHEN cancelled_chunks > 0 THEN 'cancelled'
            ELSE 'completed' END;

-- The columns of a table, in order, as a list for INSERT ... SELECT (prefixed with `alias.`):
-- the history and the live tables are copied column by column, so a column a later migration
-- adds to both moves without a change here.
CREATE OR REPLACE FUNCTION chunkd.column_list(rel regclass, alias text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT string_agg(CASE WHEN alias IS NULL THEN '' ELSE quote_ident(alias) || '.' END
                      || quote_ident(a.attname), ', ' ORDER BY a.attnum)
    FROM pg_attribute a
    WHERE a.attrelid = column_list.rel AND a.attnum > 0 AND NOT a.attisdropped;
END;

-- The partitions (one in each history table) of the range that holds `at`: the grid cell of
-- `width_s` seconds, cut short where an existing partition (of another width, from before a
-- policy changed) begins or ends. CREATE TABLE ... LIKE, then ATTACH: SHARE UPDATE EXCLUSIVE
-- on the parent, which readers of the history never wait for (CREATE TABLE ... PARTITION OF
-- would take ACCESS EXCLUSIVE). False, nothing created, when a lock was not free within the
-- caller's lock_timeout.
CREATE OR REPLACE FUNCTION chunkd.create_history_partition(at timestamptz, width_s float8)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lo timestamptz := to_timestamp(floor(extract(epoch FROM at) / width_s) * width_s);
    hi timestamptz;
    suffix text;
    t text;
BEGIN
    hi := lo + chunkd.seconds(width_s);
    lo := greatest(lo, (SELECT max(p.to_at) FROM chunkd.history_partitions p
                        WHERE p.to_at <= create_history_partition.at));
    hi := least(hi, (SELECT min(p.from_at) FROM chunkd.history_partitions p
                     WHERE p.from_at > create_history_partition.at));
    suffix := to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS');
    BEGIN
        FOREACH t IN ARRAY ARRAY['history_jobs', 'history_chunks', 'history_attempts',
                                 'history_events'] LOOP
            EXECUTE format('CREATE TABLE chunkd.%I (LIKE chunkd.%I INCLUDING ALL)',
                           t || '_p' || suffix, t);
            EXECUTE format('ALTER TABLE chunkd.%I ATTACH PARTITION chunkd.%I '
                           'FOR VALUES FROM (%L) TO (%L)', t, t || '_p' || suffix, lo, hi);
        END LOOP;
        INSERT INTO chunkd.history_partitions (from_at, to_at, suffix) VALUES (lo, hi, suffix);
        RETURN true;
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
END;
$$;

-- One batch of the move: the oldest finished jobs whose live chunks number at most max_chunks
-- go to the history, each with all its rows (chunks with their final state, attempts, events,
-- audit rows of schema version 1), and leave the live tables (their outcomes of version 1 and
-- their rate buckets too). A job with more chunks than that moves in pieces, its row last. A
-- job whose expiry has already passed (finished long ago, or a short policy) is deleted instead.
-- Job rows are locked FOR UPDATE SKIP LOCKED: an operator's retry holding one goes first, and
-- the job moves in a later round if it is still finished then. Jobs whose partition could not be
-- created (locks) wait for a later round. Returns what it did; `more`: finished jobs are left.
CREATE OR REPLACE FUNCTION chunkd.move_finished_jobs(
    max_chunks int,
    OUT moved_jobs int,
    OUT moved_chunks int,
    OUT expired_jobs int,
    OUT created_partitions int,
    OUT more boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    width_s float8 := chunkd.history_width_s();
    cand bigint[];
    n_finished int;
    j_ids bigint[];          -- this round's jobs, locked
    j_exp timestamptz[];     -- when each expires
    j_live int[];            -- chunks each still has in the live tables
    piece boolean;           -- one job, more chunks than max_chunks: a piece of it
    c_ids bigint[];          -- this round's chunks
    c_exp timestamptz[];
    first_due timestamptz;
BEGIN
    moved_jobs := 0;
    moved_chunks := 0;
    expired_jobs := 0;
    created_partitions := 0;
    -- Without locks: the oldest finished jobs, as many as fit in max_chunks (at least one).
    WITH f AS (
        SELECT j.id, j.finished_at, j.total_chunks - coalesce(m.moved_chunks, 0) AS live
        FROM (SELECT x.id, x.finished_at, x.total_chunks FROM chunkd.jobs x
              WHERE x.finished_at IS NOT NULL
              ORDER BY x.finished_at, x.id
              LIMIT max_chunks + 1) j
        LEFT JOIN chunkd.history_moving m ON m.job_id = j.id
    ), r AS (
        SELECT f.id, sum(f.live) OVER (ORDER BY f.finished_at, f.id) AS upto,
               row_number() OVER (ORDER BY f.finished_at, f.id) AS k
        FROM f
    )
    SELECT array_agg(r.id) FILTER (WHERE r.upto <= max_chunks OR r.k = 1), count(*)
    INTO cand, n_finished
    FROM r;
    more := n_finished > coalesce(cardinality(cand), 0);
    IF cand IS NULL THEN
        RETURN;
    END IF;

    -- Locked, still finished, and nothing of theirs in the queue; their expiry: the first
    -- piece's, or finished_at plus the policy of their state now.
    SELECT array_agg(x.id ORDER BY x.id), array_agg(x.exp ORDER BY x.id),
           array_agg(x.live ORDER BY x.id)
    INTO j_ids, j_exp, j_live
    FROM (
        SELECT j.id, coalesce(m.expires_at, j.finished_at + chunkd.seconds(p.keep_s)) AS exp,
               j.total_chunks - coalesce(m.moved_chunks, 0) AS live
        FROM chunkd.jobs j
        LEFT JOIN chunkd.history_moving m ON m.job_id = j.id
        JOIN chunkd.retention p
          ON p.state = CASE chunkd.final_status(j.cancelled_at, j.failed_chunks,
                                                j.cancelled_chunks)
                       WHEN 'partial_failure' THEN 'failed'
                       ELSE chunkd.final_status(j.cancelled_at, j.failed_chunks,
                                                j.cancelled_chunks) END
        WHERE j.id = ANY (cand) AND j.finished_at IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM chunkd.ready r WHERE r.job_id = j.id)
          AND NOT EXISTS (SELECT 1 FROM chunkd.scheduled s WHERE s.job_id = j.id)
        ORDER BY j.id
        FOR UPDATE OF j SKIP LOCKED
    ) x;
    IF j_ids IS NULL THEN
        more := true;
        RETURN;
    END IF;

    -- Their partitions (a few per round: jobs finishing together expire together).
    LOOP
        SELECT min(e.at) INTO first_due
        FROM unnest(j_exp) e(at)
        WHERE e.at > now()
          AND NOT EXISTS (SELECT 1 FROM chunkd.history_partitions p
                          WHERE e.at >= p.from_at AND e.at < p.to_at);
        EXIT WHEN first_due IS NULL OR created_partitions >= 16;
        EXIT WHEN NOT chunkd.create_history_partition(first_due, width_s);
        created_partitions := created_partitions + 1;
    END LOOP;
    SELECT array_agg(u.id ORDER BY u.id), array_agg(u.exp ORDER BY u.id),
           array_agg(u.live ORDER BY u.id)
    INTO j_ids, j_exp, j_live
    FROM unnest(j_ids, j_exp, j_live) u(id, exp, live)
    WHERE u.exp <= now()
       OR EXISTS (SELECT 1 FROM chunkd.history_partitions p
                  WHERE u.exp >= p.from_at AND u.exp < p.to_at);
    IF j_ids IS NULL THEN
        more := true;
        RETURN;
    END IF;

    piece := cardinality(j_ids) = 1 AND j_live[1] > max_chunks;
    IF piece THEN
        SELECT array_agg(c.id), array_agg(j_exp[1]) INTO c_ids, c_exp
        FROM (SELECT c.id FROM chunkd.chunks c WHERE c.job_id = j_ids[1]
              ORDER BY c.seq LIMIT max_chunks) c;
        more := true;
    ELSE
        SELECT array_agg(c.id), array_agg(u.exp) INTO c_ids, c_exp
        FROM unnest(j_ids, j_exp) u(id, exp)
        JOIN chunkd.chunks c ON c.job_id = u.id;
    END IF;
    c_ids := coalesce(c_ids, '{}');
    c_exp := coalesce(c_exp, '{}');

    -- Into the history (what has not expired yet). Chunks with their final state, and every
    -- row with what reading it needs of its job and chunk (ids, kind, seq).
    EXECUTE format(
        'INSERT INTO chunkd.history_chunks (%s, status, attempts, max_attempts, started_at, '
        '    completed_at, error_message, worker_id, result, sync_job_id, kind, priority, '
        '    expires_at) '
        'SELECT %s, s.status, s.attempts, j.max_attempts, s.started_at, s.ended_at, s.error, '
        '       s.worker_id, s.result, j.public_id, j.kind, j.priority, u.exp '
        'FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, exp) '
        'JOIN chunkd.chunks c ON c.id = u.id '
        'JOIN chunkd.chunk_state s ON s.id = u.id '
        'JOIN chunkd.jobs j ON j.id = c.job_id '
        'WHERE u.exp > now()',
        chunkd.column_list('chunkd.chunks'), chunkd.column_list('chunkd.chunks', 'c'))
    USING c_ids, c_exp;
    GET DIAGNOSTICS moved_chunks = ROW_COUNT;
    EXECUTE format(
        'INSERT INTO chunkd.history_attempts (%s, sync_job_id, queue_id, seq, kind, expires_at) '
        'SELECT %s, j.public_id, c.queue_id, c.seq, j.kind, u.exp '
        'FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, exp) '
        'JOIN chunkd.chunks c ON c.id = u.id '
        'JOIN chunkd.jobs j ON j.id = c.job_id '
        'JOIN chunkd.attempts a ON a.chunk_id = u.id '
        'WHERE u.exp > now()',
        chunkd.column_list('chunkd.attempts'), chunkd.column_list('chunkd.attempts', 'a'))
    USING c_ids, c_exp;
    -- Events: of the piece's chunks, or every event of the jobs (their own: job_finished, ...);
    -- audit rows of schema version 1 get ids of `events`, so they never clash when restored.
    EXECUTE format(
        'INSERT INTO chunkd.history_events (%s, v1, sync_job_id, queue_id, seq, job_kind, '
        '    expires_at) '
        'SELECT %s, false, j.public_id, c.queue_id, c.seq, j.kind, u.exp '
        'FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, exp) '
        'JOIN chunkd.jobs j ON j.id = u.id '
        'JOIN chunkd.events e ON e.job_id = u.id '
        'LEFT JOIN chunkd.chunks c ON c.id = e.chunk_id '
        'WHERE u.exp > now() AND (NOT $3 OR e.chunk_id = ANY ($4))',
        chunkd.column_list('chunkd.events'), chunkd.column_list('chunkd.events', 'e'))
    USING j_ids, j_exp, piece, c_ids;
    INSERT INTO chunkd.history_events (id, job_id, chunk_id, event, status, attempt, worker_id,
                                       error, at, v1, sync_job_id, queue_id, seq, job_kind,
                                       expires_at)
    SELECT nextval(pg_get_serial_sequence('chunkd.events', 'id')), c.job_id, c.id, v.event,
           v.status, v.attempt, v.worker_id, v.error, v.at, true, j.public_id, c.queue_id, c.seq,
           j.kind, u.exp
    FROM unnest(j_ids, j_exp) u(id, exp)
    JOIN chunkd.jobs j ON j.id = u.id
    JOIN chunkd.events_v1 v ON v.sync_job_id = j.public_id
    JOIN chunkd.chunks c ON c.queue_id = v.queue_id
    WHERE u.exp > now() AND (NOT piece OR c.id = ANY (c_ids));
    IF NOT piece THEN
        EXECUTE format(
            'INSERT INTO chunkd.history_jobs (%s, status, expires_at) '
            'SELECT %s, chunkd.final_status(j.cancelled_at, j.failed_chunks, '
            '           j.cancelled_chunks), u.exp '
            'FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, exp) '
            'JOIN chunkd.jobs j ON j.id = u.id '
            'WHERE u.exp > now()',
            chunkd.column_list('chunkd.jobs'), chunkd.column_list('chunkd.jobs', 'j'))
        USING j_ids, j_exp;
        GET DIAGNOSTICS moved_jobs = ROW_COUNT;
        expired_jobs := cardinality(j_ids) - moved_jobs;
        INSERT INTO chunkd.history_counts AS hc (from_at, kind, status, jobs, chunks)
        SELECT p.from_at, j.kind,
               chunkd.final_status(j.cancelled_at, j.failed_chunks, j.cancelled_chunks),
               count(*), sum(j.total_chunks)
        FROM unnest(j_ids, j_exp) u(id, exp)
        JOIN chunkd.jobs j ON j.id = u.id
        JOIN chunkd.history_partitions p ON u.exp >= p.from_at AND u.exp < p.to_at
        WHERE u.exp > now()
        GROUP BY 1, 2, 3
        ORDER BY 1, 2, 3
        ON CONFLICT (from_at, kind, status) DO UPDATE
        SET jobs = hc.jobs + excluded.jobs, chunks = hc.chunks + excluded.chunks;
    END IF;

    -- Out of the live tables.
    DELETE FROM chunkd.attempts a WHERE a.chunk_id = ANY (c_ids);
    DELETE FROM chunkd.legacy_outcomes o WHERE o.chunk_id = ANY (c_ids);
    IF piece THEN
        DELETE FROM chunkd.events e WHERE e.job_id = j_ids[1] AND e.chunk_id = ANY (c_ids);
        DELETE FROM chunkd.events_v1 v
        USING chunkd.jobs j, chunkd.chunks c
        WHERE j.id = j_ids[1] AND v.sync_job_id = j.public_id AND c.id = ANY (c_ids)
          AND v.queue_id = c.queue_id;
        DELETE FROM chunkd.chunks c WHERE c.id = ANY (c_ids);
        INSERT INTO chunkd.history_moving AS m (job_id, expires_at, moved_chunks)
        VALUES (j_ids[1], j_exp[1], cardinality(c_ids))
        ON CONFLICT (job_id) DO UPDATE SET moved_chunks = m.moved_chunks + excluded.moved_chunks;
    ELSE
        DELETE FROM chunkd.events e WHERE e.job_id = ANY (j_ids);
        DELETE FROM chunkd.events_v1 v USING chunkd.jobs j
        WHERE j.id = ANY (j_ids) AND v.sync_job_id = j.public_id;
        DELETE FROM chunkd.chunks c WHERE c.id = ANY (c_ids);
        DELETE FROM chunkd.job_rates r WHERE r.job_id = ANY (j_ids);
        DELETE FROM chunkd.history_moving m WHERE m.job_id = ANY (j_ids);
        DELETE FROM chunkd.jobs j WHERE j.id = ANY (j_ids);
    END IF;
END;
$$;

-- The daemons' maintenance, one bounded round (chunkd.runtime.maintenance calls it every
-- --maintenance-interval): moves up to max_chunks chunks of finished jobs to the history
-- (move_finished_jobs), then drops the history partitions whose range is past, whose rows have
-- all expired. One daemon at a time: the others find the advisory lock taken and do nothing
-- (ran false). Every lock is waited for at most 50 ms (a partition's DROP takes ACCESS EXCLUSIVE
-- on the history tables; a reader of the history waits for it at most that long); what did not
-- get its locks is left for the next round. `more`: there is more to do now.
-- carry grants: chunkd.reap_expired() -> chunkd.retention_round(integer)
CREATE OR REPLACE FUNCTION chunkd.retention_round(max_chunks int DEFAULT 5000)
RETURNS TABLE (ran boolean, moved_jobs int, moved_chunks int, expired_jobs int,
               created_partitions int, dropped_partitions int, more boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '50ms'
SET jit = off
AS $$
DECLARE
    m record;
    p record;
    dropped int := 0;
    left_over boolean := false;
BEGIN
    IF max_chunks IS NULL OR max_chunks < 1 OR max_chunks > 1000000 THEN
        RAISE EXCEPTION 'chunkd: max_chunks must be between 1 and 1000000, got %',
            coalesce(max_chunks::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('chunkd.retention')) THEN
        RETURN QUERY SELECT false, 0, 0, 0, 0, 0, false;
        RETURN;
    END IF;
    BEGIN
        m := chunkd.move_finished_jobs(max_chunks);
    EXCEPTION WHEN lock_not_available THEN
        SELECT 0 AS moved_jobs, 0 AS moved_chunks, 0 AS expired_jobs, 0 AS created_partitions,
               true AS more INTO m;
    END;
    FOR p IN SELECT x.from_at, x.suffix FROM chunkd.history_partitions x
             WHERE x.to_at <= now() ORDER BY x.from_at LOOP
        BEGIN
            EXECUTE format('DROP TABLE IF EXISTS chunkd.%I, chunkd.%I, chunkd.%I, chunkd.%I',
                           'history_jobs_p' || p.suffix, 'history_chunks_p' || p.suffix,
                           'history_attempts_p' || p.suffix, 'history_events_p' || p.suffix);
            DELETE FROM chunkd.history_partitions x WHERE x.from_at = p.from_at;
            dropped := dropped + 1;
        EXCEPTION WHEN lock_not_available THEN
            left_over := true;
            EXIT;
        END;
    END LOOP;
    RETURN QUERY SELECT true, m.moved_jobs, m.moved_chunks, m.expired_jobs, m.created_partitions,
                        dropped, m.more OR left_over;
END;
$$;

-- Brings a job's rows back from the history to the live tables, ids kept (an operator's retry
-- of a finished job): its job row, chunks, attempts, events, its audit rows and outcomes of
-- schema version 1, a full rate bucket; and the pieces of a job still moving. Returns the job's
-- internal id, or NULL when the history holds nothing of it.
CREATE OR REPLACE FUNCTION chunkd.restore_job(sync_job_id uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    h record;
    job bigint;
    exp timestamptz;
    pub uuid := restore_job.sync_job_id;
BEGIN
    SELECT x.id, x.expires_at, x.kind, x.status, x.total_chunks, x.max_per_second INTO h
    FROM chunkd.history_jobs x WHERE x.public_id = pub FOR UPDATE;
    IF FOUND THEN
        job := h.id;
        exp := h.expires_at;
        EXECUTE format(
            'INSERT INTO chunkd.jobs (%s) OVERRIDING SYSTEM VALUE '
            'SELECT %s FROM chunkd.history_jobs h WHERE h.public_id = $1 AND h.expires_at = $2',
            chunkd.column_list('chunkd.jobs'), chunkd.column_list('chunkd.jobs', 'h'))
        USING pub, exp;
        IF h.max_per_second IS NOT NULL THEN
            INSERT INTO chunkd.job_rates (job_id, per_second, burst, tokens)
            VALUES (job, h.max_per_second, chunkd.default_burst(h.max_per_second),
                    chunkd.default_burst(h.max_per_second));
        END IF;
        DELETE FROM chunkd.history_jobs x WHERE x.public_id = pub AND x.expires_at = exp;
        UPDATE chunkd.history_counts c SET jobs = c.jobs - 1, chunks = c.chunks - h.total_chunks
        FROM chunkd.history_partitions p
        WHERE exp >= p.from_at AND exp < p.to_at
          AND c.from_at = p.from_at AND c.kind = h.kind AND c.status = h.status;
    ELSE
        SELECT j.id, m.expires_at INTO job, exp
        FROM chunkd.jobs j JOIN chunkd.history_moving m ON m.job_id = j.id
        WHERE j.public_id = pub;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        DELETE FROM chunkd.history_moving m WHERE m.job_id = job;
    END IF;
    EXECUTE format(
        'INSERT INTO chunkd.chunks (%s) OVERRIDING SYSTEM VALUE '
        'SELECT %s FROM chunkd.history_chunks c WHERE c.sync_job_id = $1 AND c.expires_at = $2',
        chunkd.column_list('chunkd.chunks'), chunkd.column_list('chunkd.chunks', 'c'))
    USING pub, exp;
    EXECUTE format(
        'INSERT INTO chunkd.attempts (%s) '
        'SELECT %s FROM chunkd.history_attempts a WHERE a.sync_job_id = $1 AND a.expires_at = $2',
        chunkd.column_list('chunkd.attempts'), chunkd.column_list('chunkd.attempts', 'a'))
    USING pub, exp;
    -- A chunk of schema version 1 that was never claimed since has its outcome in its row.
    INSERT INTO chunkd.legacy_outcomes (chunk_id, status, attempt, worker_id, started_at,
                                        completed_at, error, result)
    SELECT c.id, c.status, c.attempts, c.worker_id, c.started_at, c.completed_at,
           c.error_message, c.result
    FROM chunkd.history_chunks c
    WHERE c.sync_job_id = pub AND c.expires_at = exp AND c.legacy
      AND NOT EXISTS (SELECT 1 FROM chunkd.attempts a WHERE a.chunk_id = c.id);
    EXECUTE format(
        'INSERT INTO chunkd.events (%s) OVERRIDING SYSTEM VALUE '
        'SELECT %s FROM chunkd.history_events e '
        'WHERE e.sync_job_id = $1 AND e.expires_at = $2 AND NOT e.v1',
        chunkd.column_list('chunkd.events'), chunkd.column_list('chunkd.events', 'e'))
    USING pub, exp;
    INSERT INTO chunkd.events_v1 (queue_id, sync_job_id, event, status, attempt, worker_id,
                                  error, at)
    SELECT e.queue_id, pub, e.event, e.status, e.attempt, e.worker_id, e.error, e.at
    FROM chunkd.history_events e
    WHERE e.sync_job_id = pub AND e.expires_at = exp AND e.v1
    ORDER BY e.id;
    DELETE FROM chunkd.history_attempts a WHERE a.sync_job_id = pub AND a.expires_at = exp;
    DELETE FROM chunkd.history_events e WHERE e.sync_job_id = pub AND e.expires_at = exp;
    DELETE FROM chunkd.history_chunks c WHERE c.sync_job_id = pub AND c.expires_at = exp;
    RETURN job;
END;
$$;

-- The history of jobs finished before `cutoff`: deleted (purge_finished_jobs, by hand: the one
-- place that deletes from the history), counts kept. Jobs another session holds are skipped.
-- Returns how many jobs.
CREATE OR REPLACE FUNCTION chunkd.purge_history(cutoff timestamptz) RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids uuid[];
    exps timestamptz[];
BEGIN
    SELECT array_agg(d.public_id), array_agg(d.expires_at) INTO ids, exps
    FROM (SELECT h.public_id, h.expires_at FROM chunkd.history_jobs h
          WHERE h.finished_at < cutoff
          FOR UPDATE SKIP LOCKED) d;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM chunkd.history_attempts a USING unnest(ids, exps) u(id, exp)
    WHERE a.sync_job_id = u.id AND a.expires_at = u.exp;
    DELETE FROM chunkd.history_events e USING unnest(ids, exps) u(id, exp)
    WHERE e.sync_job_id = u.id AND e.expires_at = u.exp;
    DELETE FROM chunkd.history_chunks c USING unnest(ids, exps) u(id, exp)
    WHERE c.sync_job_id = u.id AND c.expires_at = u.exp;
    WITH gone AS (
        DELETE FROM chunkd.history_jobs h USING unnest(ids, exps) u(id, exp)
        WHERE h.public_id = u.id AND h.expires_at = u.exp
        RETURNING h.kind, h.status, h.total_chunks, h.expires_at
    ), counted AS (
        SELECT p.from_at, g.kind, g.status, count(*) AS jobs, sum(g.total_chunks) AS chunks
        FROM gone g
        JOIN chunkd.history_partitions p ON g.expires_at >= p.from_at AND g.expires_at < p.to_at
        GROUP BY 1, 2, 3
    )
    UPDATE chunkd.history_counts c SET jobs = c.jobs - n.jobs, chunks = c.chunks - n.chunks
    FROM counted n
    WHERE c.from_at = n.from_at AND c.kind = n.kind AND c.status = n.status;
    RETURN cardinality(ids);
END;
$$;
