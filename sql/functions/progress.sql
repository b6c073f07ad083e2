-- Progress and monitoring, read-only: a job's progress, the queue's depth, and the pages of the
-- dashboard (`chunkd web`). After the views: some read them.

-- Every function here is read on a schedule (the metrics, the dashboard, `chunkd status`), so
-- none may compile its plan to machine code (SET jit = off): PostgreSQL does that for a plan
-- whose estimated cost passes jit_above_cost, which a table never analyzed (a fresh database,
-- a burst of writes before autovacuum's first ANALYZE) makes easy, and the compilation alone
-- took 30 ms where the query took 1 (queue_depth() with 40,000 finished jobs).

-- The seed's progress report of one job, as JSON (docs/sql-api.md lists its keys), live or in
-- the history. PL/pgSQL so that a session keeps its plan: planning the history's partitions is
-- most of its cost (a SQL function's body is planned again at every call).
-- total_is_final: false while the job is open, or while it grows by continuations and is not
-- finished (any running chunk may append more); eta_seconds then covers the chunks known so far.
-- Times in UTC, whatever the session's TimeZone: printed in another zone, a time near either
-- end of what chunkd stores would read as year 10000 or BC, which no datetime can parse.
CREATE OR REPLACE FUNCTION chunkd.get_sync_job_progress(sync_job_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET TimeZone = 'UTC'
AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
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
        'on_finish_kind', j.on_finish_kind,
        'label', j.label)
    FROM chunkd.chunk_processing_status s
    JOIN chunkd.all_jobs j ON j.public_id = s.parent_sync_job_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN s.started_at IS NULL THEN NULL
                    ELSE round((s.completed_chunks + s.failed_chunks)::numeric
                               / greatest(extract(epoch FROM
                                   coalesce(s.finished_at, now()) - s.started_at), 0.001), 2)
               END AS chunks_per_second
    ) r
    WHERE s.parent_sync_job_id = get_sync_job_progress.sync_job_id);
END;
$$;

-- Live queue depth for metrics: pending (due now and free to run), paused (due, held by a
-- paused job or kind), throttled (due, under a rate limit or a concurrency key's limit: they
-- run at its pace), scheduled (waiting for a retry's run_at) and processing. Reads only live
-- rows, never the finished history. A limited chunk's job is looked up by its key, chunk by
-- chunk (a join with jobs was hashed over every job when the tables had no statistics).
CREATE OR REPLACE FUNCTION chunkd.queue_depth()
RETURNS TABLE (status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
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
                        OR (r.limited AND EXISTS (
                                SELECT 1 FROM chunkd.jobs j
                                WHERE j.id = r.job_id
                                  AND (j.max_per_second IS NOT NULL
                                       OR EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                                                  WHERE l.key = j.concurrency_key))))
                   THEN 'throttled'
                   ELSE 'pending'
               END AS status
        FROM chunkd.ready r
        LEFT JOIN chunkd.kind_flow k ON k.kind = r.kind
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

-- The live queue by job kind and status: pending (due now and free to run), paused (due, held
-- by a paused job or kind), throttled (due, under a rate limit or a concurrency key's limit),
-- scheduled (waiting for a retry or a later start), processing. Only pairs that have chunks.
-- The same classification as queue_depth(): summed over the kinds, the two are equal.
CREATE OR REPLACE FUNCTION chunkd.queue_depth_by_kind()
RETURNS TABLE (kind text, status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    WITH paused_jobs AS (
        SELECT j.id FROM chunkd.jobs j
        WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
    ), due AS (
        SELECT r.kind,
               CASE
                   WHEN k.paused_at IS NOT NULL
                        OR r.job_id = ANY (ARRAY(SELECT p.id FROM paused_jobs p))
                   THEN 'paused'
                   WHEN k.per_second IS NOT NULL
                        OR (r.limited AND EXISTS (
                                SELECT 1 FROM chunkd.jobs j
                                WHERE j.id = r.job_id
                                  AND (j.max_per_second IS NOT NULL
                                       OR EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                                                  WHERE l.key = j.concurrency_key))))
                   THEN 'throttled'
                   ELSE 'pending'
               END AS status
        FROM chunkd.ready r
        LEFT JOIN chunkd.kind_flow k ON k.kind = r.kind
    )
    SELECT d.kind, d.status, count(*) FROM due d GROUP BY d.kind, d.status
    UNION ALL
    SELECT s.kind, 'scheduled', count(*) FROM chunkd.scheduled s GROUP BY s.kind
    UNION ALL
    SELECT j.kind, 'processing', count(*)
    FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id
    WHERE a.ended_at IS NULL
    GROUP BY j.kind;
END;

-- How many jobs (of one kind, or all) are in each overall_status: the live jobs counted, the
-- history's from chunkd.history_counts (kept by every statement that adds or removes history),
-- so the count never scans the history, however long it is kept. The live jobs are grouped by
-- what overall_status() reads (its kind and seven yes-or-no facts, as bits: so every job of a
-- group has the same status) and the status is computed once per group, on its first job:
-- calling it for every row cost 5 us a row (its body holds a subquery, so it is never inlined),
-- 140 ms for 27,000 live jobs.
CREATE OR REPLACE FUNCTION chunkd.sync_job_status_counts(kind text DEFAULT NULL)
RETURNS TABLE (overall_status text, jobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    SELECT x.overall_status, sum(x.jobs)::bigint
    FROM (
        SELECT chunkd.overall_status(r) AS overall_status, g.n AS jobs
        FROM (
            SELECT min(j.id) AS id, count(*) AS n
            FROM chunkd.jobs j
            WHERE sync_job_status_counts.kind IS NULL OR j.kind = sync_job_status_counts.kind
            GROUP BY j.kind,
                     (j.cancelled_at IS NULL)::int | (j.finished_at IS NULL)::int << 1
                     | (j.paused_at IS NULL)::int << 2 | (j.started_at IS NULL)::int << 3
                     | coalesce(j.run_at > now(), false)::int << 4
                     | (j.failed_chunks > 0)::int << 5 | (j.cancelled_chunks > 0)::int << 6
        ) g
        JOIN chunkd.jobs r ON r.id = g.id
        UNION ALL
        SELECT c.status, sum(c.jobs)
        FROM chunkd.history_counts c
        WHERE sync_job_status_counts.kind IS NULL OR c.kind = sync_job_status_counts.kind
        GROUP BY 1
    ) x
    GROUP BY 1
    HAVING sum(x.jobs) > 0;
END;

-- Every job kind, live or in the history (the dashboard's filter), without scanning the history.
-- carry grants: chunkd.sync_jobs_page(text,text,integer,integer) -> chunkd.sync_job_kinds()
CREATE OR REPLACE FUNCTION chunkd.sync_job_kinds() RETURNS TABLE (kind text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    SELECT j.kind FROM chunkd.jobs j
    UNION
    SELECT c.kind FROM chunkd.history_counts c WHERE c.jobs > 0
    ORDER BY 1;
END;

-- One page of jobs, newest first: the live jobs and the history merged. Each part is read
-- newest first through its created_at index (of the kind, of the status, in the history) and
-- only as far as the page reaches, so a page costs its size and its offset, not the history's.
-- The statement is built for the filters given (EXECUTE: planned with them each time, never
-- with one plan for "any kind, any status"); values are bound, never spliced. Behind
-- sync_jobs_page (whose argument names, the same as its columns', PL/pgSQL refuses).
CREATE OR REPLACE FUNCTION chunkd.jobs_page(p_kind text, p_status text, p_size int, p_skip int)
RETURNS TABLE (parent_sync_job_id uuid, kind text, total_chunks int, pending_chunks int,
               processing_chunks int, completed_chunks int, failed_chunks int,
               cancelled_chunks int, overall_status text, progress_percentage numeric,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               run_at timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    live_where text := 'true';
    old_where text := 'true';
BEGIN
    IF p_kind IS NOT NULL THEN
        live_where := live_where || ' AND j.kind = $1';
        old_where := old_where || ' AND h.kind = $1';
    END IF;
    IF p_status IS NOT NULL THEN
        -- What the status implies of the row's columns first (cheap), then the status itself
        -- (a function call per row: only on the rows that may have it).
        live_where := live_where || CASE p_status
            WHEN 'completed' THEN ' AND j.finished_at IS NOT NULL AND j.cancelled_at IS NULL'
                                  ' AND j.failed_chunks = 0 AND j.cancelled_chunks = 0'
            WHEN 'partial_failure' THEN ' AND j.finished_at IS NOT NULL AND j.cancelled_at IS NULL'
                                        ' AND j.failed_chunks > 0'
            WHEN 'cancelled' THEN ' AND (j.cancelled_at IS NOT NULL OR j.finished_at IS NOT NULL'
                                  ' AND j.failed_chunks = 0 AND j.cancelled_chunks > 0)'
            ELSE ' AND j.finished_at IS NULL AND j.cancelled_at IS NULL' END
            || ' AND chunkd.overall_status(j) = $2';
        old_where := old_where || ' AND h.status = $2';
    END IF;
    RETURN QUERY EXECUTE format($q$
    WITH live AS (
        SELECT j.id, j.public_id, j.kind, j.total_chunks, j.completed_chunks, j.failed_chunks,
               j.cancelled_chunks, j.created_at, j.started_at, j.finished_at, j.run_at,
               chunkd.overall_status(j) AS overall_status
        FROM chunkd.jobs j
        WHERE %s
        ORDER BY j.created_at DESC, j.public_id
        LIMIT $3 + $4
    ), old AS (
        SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks, h.failed_chunks,
               h.cancelled_chunks, h.created_at, h.started_at, h.finished_at, h.run_at,
               h.status AS overall_status
        FROM chunkd.history_jobs h
        WHERE %s
        ORDER BY h.created_at DESC, h.public_id
        LIMIT $3 + $4
    ), page AS (
        SELECT x.* FROM (SELECT * FROM live UNION ALL SELECT * FROM old) x
        ORDER BY x.created_at DESC, x.public_id
        LIMIT $3 OFFSET $4
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
    ORDER BY p.created_at DESC, p.public_id
    $q$, live_where, old_where)
    USING p_kind, p_status, greatest(p_size, 0), greatest(p_skip, 0);
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.sync_jobs_page(kind text DEFAULT NULL, status text DEFAULT NULL,
                                      page_size int DEFAULT 50, skip int DEFAULT 0)
RETURNS TABLE (parent_sync_job_id uuid, kind text, total_chunks int, pending_chunks int,
               processing_chunks int, completed_chunks int, failed_chunks int,
               cancelled_chunks int, overall_status text, progress_percentage numeric,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               run_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    SELECT * FROM chunkd.jobs_page(sync_jobs_page.kind, sync_jobs_page.status,
                                   sync_jobs_page.page_size, sync_jobs_page.skip);
END;

-- The least text above every text that starts with `prefix`, in byte order (COLLATE "C"):
-- the upper end of the range of a prefix search. NULL when there is none (every character of
-- the prefix is the encoding's last one), or for an empty prefix.
CREATE OR REPLACE FUNCTION chunkd.text_after_prefix(prefix text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    head text := prefix;
    c int;
BEGIN
    WHILE head <> '' LOOP
        c := ascii(right(head, 1)) + 1;
        IF c = 55296 THEN
            c := 57344;  -- after U+D7FF comes U+E000: the surrogates are no characters
        END IF;
        BEGIN
            RETURN left(head, -1) || chr(c);
        EXCEPTION WHEN program_limit_exceeded THEN
            head := left(head, -1);  -- the encoding's last character: carry to the one before
        END;
    END LOOP;
    RETURN NULL;
END;
$$;

-- One page of jobs, newest first, as sync_jobs_page gives them (the same columns, then the
-- job's label and dedupe key), live or in the history, of kind `only_kind` and overall_status
-- `only_status` (NULL: any), and matching `search` (NULL or blank: every job). A search
-- matches the start of a job's kind, label or dedupe key, ignoring case, and, when it can
-- begin a job id (hex digits, with dashes where an id has them), the start of the id. At most
-- 256 characters (22023 beyond). The dashboard's jobs page; its read-only role, which could
-- call sync_jobs_page before, may call this one after the upgrade.
--
-- Every match is a range of an index, the live jobs' (migration 15) and the history's
-- (migration 16): public_id between the prefix padded with 0s and with fs; lower(kind),
-- lower(label), lower(dedupe_key) in byte order from the prefix to text_after_prefix(prefix).
-- Each field of each table gives at most skip + page_size jobs, newest first, then the page is
-- cut from their union (the history's rows whole: no join back, whose plan would depend on
-- statistics a fresh partition does not have). The statement runs through EXECUTE, so it is planned with the values
-- at hand: a prefix that matches few jobs reads them from its index, one that matches most (a
-- busy kind) walks the table's created_at index from the newest instead, as the planner's
-- statistics say.
-- carry grants: chunkd.sync_jobs_page(text,text,integer,integer) -> chunkd.search_sync_jobs(text,text,text,integer,integer)
CREATE OR REPLACE FUNCTION chunkd.search_sync_jobs(search text DEFAULT NULL,
                                                   only_kind text DEFAULT NULL,
                                                   only_status text DEFAULT NULL,
                                                   page_size int DEFAULT 50, skip int DEFAULT 0)
RETURNS TABLE (parent_sync_job_id uuid, kind text, total_chunks int, pending_chunks int,
               processing_chunks int, completed_chunks int, failed_chunks int,
               cancelled_chunks int, overall_status text, progress_percentage numeric,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               run_at timestamptz, label text, dedupe_key text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    term text := nullif(btrim(search_sync_jobs.search), '');
    hex text;
    by_id boolean := false;
    id_low uuid;
    id_high uuid;
    low text;
    high text;
    lim bigint := greatest(coalesce(page_size, 50), 0);
    off bigint := greatest(coalesce(skip, 0), 0);
    -- A status filter of the live jobs: what the status implies of the row's columns first
    -- (cheap), then the status itself (a function call per row: only on the rows that may
    -- have it), as jobs_page does.
    live_status text := 'true';
BEGIN
    IF only_status IS NOT NULL THEN
        live_status := CASE only_status
            WHEN 'completed' THEN 'j.finished_at IS NOT NULL AND j.cancelled_at IS NULL'
                                  ' AND j.failed_chunks = 0 AND j.cancelled_chunks = 0'
            WHEN 'partial_failure' THEN 'j.finished_at IS NOT NULL AND j.cancelled_at IS NULL'
                                        ' AND j.failed_chunks > 0'
            WHEN 'cancelled' THEN '(j.cancelled_at IS NOT NULL OR j.finished_at IS NOT NULL'
                                  ' AND j.failed_chunks = 0 AND j.cancelled_chunks > 0)'
            ELSE 'j.finished_at IS NULL AND j.cancelled_at IS NULL' END
            || ' AND chunkd.overall_status(j) = $3';
    END IF;
    IF length(term) > 256 THEN
        RAISE EXCEPTION 'chunkd: a search is at most 256 characters (the start of a kind, a '
            'label, a dedupe key or a job id), got %', length(term) USING ERRCODE = '22023';
    END IF;
    IF term IS NOT NULL THEN
        low := lower(term);
        high := chunkd.text_after_prefix(low);
        hex := replace(low, '-', '');
        -- 3fa85f64, 3fa85f64-5717-4562, 3fa85f645717: the start of an id, as printed or without
        -- its dashes.
        by_id := hex ~ '^[0-9a-f]{1,32}$'
                 AND (hex = low OR left(rpad(hex, 32, '0')::uuid::text, length(low)) = low);
        IF by_id THEN
            id_low := rpad(hex, 32, '0')::uuid;
            id_high := rpad(hex, 32, 'f')::uuid;
        END IF;
    END IF;
    RETURN QUERY EXECUTE format($q$
        WITH hits AS (
            (SELECT j.id FROM chunkd.jobs j
             WHERE $1 IS NULL
               AND ($2::text IS NULL OR j.kind = $2)
               AND %1$s
             ORDER BY j.created_at DESC, j.public_id LIMIT $4)
            UNION
            (SELECT j.id FROM chunkd.jobs j
             WHERE $5 AND j.public_id BETWEEN $6 AND $7
               AND ($2::text IS NULL OR j.kind = $2)
               AND %1$s
             ORDER BY j.created_at DESC, j.public_id LIMIT $4)
            UNION
            (SELECT j.id FROM chunkd.jobs j
             WHERE lower(j.kind) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(j.kind) COLLATE "C" < $9)
               AND starts_with(lower(j.kind), $8)
               AND ($2::text IS NULL OR j.kind = $2)
               AND %1$s
             ORDER BY j.created_at DESC, j.public_id LIMIT $4)
            UNION
            (SELECT j.id FROM chunkd.jobs j
             WHERE j.label IS NOT NULL AND lower(j.label) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(j.label) COLLATE "C" < $9)
               AND starts_with(lower(j.label), $8)
               AND ($2::text IS NULL OR j.kind = $2)
               AND %1$s
             ORDER BY j.created_at DESC, j.public_id LIMIT $4)
            UNION
            (SELECT j.id FROM chunkd.jobs j
             WHERE j.dedupe_key IS NOT NULL AND lower(j.dedupe_key) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(j.dedupe_key) COLLATE "C" < $9)
               AND starts_with(lower(j.dedupe_key), $8)
               AND ($2::text IS NULL OR j.kind = $2)
               AND %1$s
             ORDER BY j.created_at DESC, j.public_id LIMIT $4)
        ), old_hits AS (
            (SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks,
                    h.failed_chunks, h.cancelled_chunks, h.created_at, h.started_at,
                    h.finished_at, h.run_at, h.label, h.dedupe_key, h.status
             FROM chunkd.history_jobs h
             WHERE $1 IS NULL
               AND ($2::text IS NULL OR h.kind = $2)
               AND ($3::text IS NULL OR h.status = $3)
             ORDER BY h.created_at DESC, h.public_id LIMIT $4)
            UNION
            (SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks,
                    h.failed_chunks, h.cancelled_chunks, h.created_at, h.started_at,
                    h.finished_at, h.run_at, h.label, h.dedupe_key, h.status
             FROM chunkd.history_jobs h
             WHERE $5 AND h.public_id BETWEEN $6 AND $7
               AND ($2::text IS NULL OR h.kind = $2)
               AND ($3::text IS NULL OR h.status = $3)
             ORDER BY h.created_at DESC, h.public_id LIMIT $4)
            UNION
            (SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks,
                    h.failed_chunks, h.cancelled_chunks, h.created_at, h.started_at,
                    h.finished_at, h.run_at, h.label, h.dedupe_key, h.status
             FROM chunkd.history_jobs h
             WHERE lower(h.kind) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(h.kind) COLLATE "C" < $9)
               AND starts_with(lower(h.kind), $8)
               AND ($2::text IS NULL OR h.kind = $2)
               AND ($3::text IS NULL OR h.status = $3)
             ORDER BY h.created_at DESC, h.public_id LIMIT $4)
            UNION
            (SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks,
                    h.failed_chunks, h.cancelled_chunks, h.created_at, h.started_at,
                    h.finished_at, h.run_at, h.label, h.dedupe_key, h.status
             FROM chunkd.history_jobs h
             WHERE h.label IS NOT NULL AND lower(h.label) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(h.label) COLLATE "C" < $9)
               AND starts_with(lower(h.label), $8)
               AND ($2::text IS NULL OR h.kind = $2)
               AND ($3::text IS NULL OR h.status = $3)
             ORDER BY h.created_at DESC, h.public_id LIMIT $4)
            UNION
            (SELECT h.id, h.public_id, h.kind, h.total_chunks, h.completed_chunks,
                    h.failed_chunks, h.cancelled_chunks, h.created_at, h.started_at,
                    h.finished_at, h.run_at, h.label, h.dedupe_key, h.status
             FROM chunkd.history_jobs h
             WHERE h.dedupe_key IS NOT NULL AND lower(h.dedupe_key) COLLATE "C" >= $8
               AND ($9::text IS NULL OR lower(h.dedupe_key) COLLATE "C" < $9)
               AND starts_with(lower(h.dedupe_key), $8)
               AND ($2::text IS NULL OR h.kind = $2)
               AND ($3::text IS NULL OR h.status = $3)
             ORDER BY h.created_at DESC, h.public_id LIMIT $4)
        ), page AS (
            (SELECT j.id, j.public_id, j.kind, j.total_chunks, j.completed_chunks,
                    j.failed_chunks, j.cancelled_chunks, j.created_at, j.started_at,
                    j.finished_at, j.run_at, j.label, j.dedupe_key,
                    chunkd.overall_status(j) AS overall_status
             FROM hits x JOIN chunkd.jobs j ON j.id = x.id)
            UNION ALL
            (SELECT * FROM old_hits)
            ORDER BY created_at DESC, public_id
            LIMIT $10 OFFSET $11
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
               coalesce(round((p.completed_chunks + p.failed_chunks + p.cancelled_chunks)
                              * 100.0 / nullif(p.total_chunks, 0), 2), 0),
               p.created_at, p.started_at, p.finished_at, p.run_at, p.label, p.dedupe_key
        FROM page p LEFT JOIN running r ON r.job_id = p.id
        ORDER BY p.created_at DESC, p.public_id
    $q$, live_status) USING term, only_kind, only_status, lim + off, by_id, id_low, id_high, low, high, lim,
              off;
END;
$$;

-- A kind's flow controls and what it has now: its pause (NULL: not paused) and rate (NULL:
-- none; tokens as flow_limits() reads them), its chunks processing and pending (due or
-- waiting) and its unfinished jobs. Always one row: a kind nothing is known of has no
-- controls and nothing in flight.
-- carry grants: chunkd.sync_jobs_page(text,text,integer,integer) -> chunkd.kind_state(text)
CREATE OR REPLACE FUNCTION chunkd.kind_state(kind text)
RETURNS TABLE (
    paused_at timestamptz,
    per_second numeric,
    burst int,
    tokens float8,
    processing bigint,
    pending bigint,
    active_jobs bigint
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT k.paused_at, k.per_second, k.burst,
           CASE WHEN k.per_second IS NOT NULL
                THEN chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp())
           END,
           (SELECT count(*) FROM chunkd.jobs j JOIN chunkd.attempts a ON a.job_id = j.id
            WHERE j.kind = kind_state.kind AND j.finished_at IS NULL AND j.cancelled_at IS NULL
              AND a.ended_at IS NULL),
           chunkd.pending_of_kind(kind_state.kind)::bigint,
           (SELECT count(*) FROM chunkd.jobs j
            WHERE j.kind = kind_state.kind AND j.finished_at IS NULL AND j.cancelled_at IS NULL)
    FROM (SELECT) x
    LEFT JOIN chunkd.kind_flow k ON k.kind = kind_state.kind;
END;

-- Chunks each worker holds now (open attempts), by worker id. Workers holding none are absent.
CREATE OR REPLACE FUNCTION chunkd.in_flight_by_worker()
RETURNS TABLE (worker_id text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
BEGIN ATOMIC
    SELECT a.worker_id, count(*) FROM chunkd.attempts a
    WHERE a.ended_at IS NULL
    GROUP BY a.worker_id;
END;

-- Zero rows for an unknown job; a finished job (live or in the history) has no tokens. Times by
-- the database clock; tokens as flow_limits() reads them (whole tokens are chunks that may start
-- now). A job's burst is what create_sync_job gave its bucket. PL/pgSQL: a session keeps the
-- plan (see get_sync_job_progress).
CREATE OR REPLACE FUNCTION chunkd.job_flow(sync_job_id uuid)
RETURNS TABLE (
    paused_at timestamptz,         -- the job's own pause
    max_per_second numeric,        -- the job's own rate
    burst int,
    tokens float8,
    concurrency_key text,
    key_max_concurrency int,       -- NULL: the key has no limit
    key_processing bigint,         -- chunks of the key's unfinished jobs processing now
    kind_paused_at timestamptz,
    kind_per_second numeric,
    kind_burst int,
    kind_tokens float8
)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT j.paused_at, j.max_per_second,
           CASE WHEN j.max_per_second IS NOT NULL THEN chunkd.default_burst(j.max_per_second) END,
           CASE WHEN r.job_id IS NOT NULL AND j.finished_at IS NULL
                THEN chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst,
                                         clock_timestamp())
           END,
           j.concurrency_key, l.max_concurrency,
           -- A keyed job is `limited`: its open attempts are in attempts_open_limited.
           CASE WHEN j.concurrency_key IS NOT NULL THEN
               (SELECT count(*) FROM chunkd.jobs o
                JOIN chunkd.attempts a ON a.job_id = o.id AND a.limited AND a.ended_at IS NULL
                WHERE o.concurrency_key = j.concurrency_key AND o.finished_at IS NULL)
           END,
           k.paused_at, k.per_second, k.burst,
           CASE WHEN k.per_second IS NOT NULL
                THEN chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp())
           END
    FROM chunkd.all_jobs j
    LEFT JOIN chunkd.job_rates r ON r.job_id = j.id
    LEFT JOIN chunkd.concurrency_limits l ON l.key = j.concurrency_key
    LEFT JOIN chunkd.kind_flow k ON k.kind = j.kind
    WHERE j.public_id = job_flow.sync_job_id;
END;
$$;
