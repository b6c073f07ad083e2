-- chunkd schema version 4: read-only functions for `chunkd web`.
--
-- The dashboard reads through the public views (chunk_processing_status, chunk_processing_queue,
-- chunk_events, sync_jobs, workers) and functions (get_sync_job_progress, queue_depth). Some
-- of its figures cannot be had fast enough from those:
--
-- - the live queue by kind, and what each worker holds: the views derive each chunk's state,
--   so these would read every chunk ever enqueued;
-- - a page of the jobs list, filtered by kind and status, and the jobs by status: the view
--   chunk_processing_status counts each job's pending chunks, and the planner, seeing one big
--   job hold most of the ready rows, counts them with a scan of the whole ready table per job
--   (measured: 12 s for the 50th page of 10,000 jobs beside a job of 100,000 chunks).
--
-- These read only the jobs' rows and live rows (ready, scheduled, open attempts), like
-- queue_depth(), so their cost follows the jobs and the in-flight work, never the history.
-- All are STABLE and change nothing; a read-only dashboard role is granted EXECUTE on them
-- (docs/security.md).

-- One page of jobs, newest first, of one kind and one overall status (NULL: any), with the
-- columns of chunk_processing_status. Processing = the job's open attempts (an index holds
-- only those); pending = the rest of its unfinished chunks: every chunk that is not terminal
-- is either in the queue (ready, scheduled) or held by exactly one open attempt.
CREATE FUNCTION chunkd.sync_jobs_page(kind text DEFAULT NULL, status text DEFAULT NULL,
                                      page_size int DEFAULT 50, skip int DEFAULT 0)
RETURNS TABLE (parent_sync_job_id uuid, kind text, total_chunks int, pending_chunks int,
               processing_chunks int, completed_chunks int, failed_chunks int,
               cancelled_chunks int, overall_status text, progress_percentage numeric,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH page AS (
        SELECT j.id, j.public_id, j.kind, j.total_chunks, j.completed_chunks, j.failed_chunks,
               j.cancelled_chunks, j.created_at, j.started_at, j.finished_at, st.overall_status
        FROM chunkd.jobs j
        -- overall_status exactly as chunk_processing_status defines it, from the row alone.
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
                WHEN j.finished_at IS NULL THEN
                    CASE WHEN j.started_at IS NULL THEN 'pending' ELSE 'processing' END
                WHEN j.failed_chunks > 0 THEN 'partial_failure'
                WHEN j.cancelled_chunks > 0 THEN 'cancelled'
                ELSE 'completed'
            END AS overall_status
        ) st
        WHERE (sync_jobs_page.kind IS NULL OR j.kind = sync_jobs_page.kind)
          AND (sync_jobs_page.status IS NULL OR st.overall_status = sync_jobs_page.status)
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
           round((p.completed_chunks + p.failed_chunks + p.cancelled_chunks) * 100.0
                 / p.total_chunks, 2),
           p.created_at, p.started_at, p.finished_at
    FROM page p LEFT JOIN running r ON r.job_id = p.id
    ORDER BY p.created_at DESC, p.public_id;
END;

-- How many jobs of one kind (NULL: any) are in each overall status.
CREATE FUNCTION chunkd.sync_job_status_counts(kind text DEFAULT NULL)
RETURNS TABLE (overall_status text, jobs bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT CASE
        WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
        WHEN j.finished_at IS NULL THEN
            CASE WHEN j.started_at IS NULL THEN 'pending' ELSE 'processing' END
        WHEN j.failed_chunks > 0 THEN 'partial_failure'
        WHEN j.cancelled_chunks > 0 THEN 'cancelled'
        ELSE 'completed'
    END, count(*)
    FROM chunkd.jobs j
    WHERE sync_job_status_counts.kind IS NULL OR j.kind = sync_job_status_counts.kind
    GROUP BY 1;
END;

-- The live queue by job kind and status: pending (due now), scheduled (waiting for a retry or
-- a later start), processing. Only pairs that have chunks.
CREATE FUNCTION chunkd.queue_depth_by_kind()
RETURNS TABLE (kind text, status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT r.kind, 'pending', count(*) FROM chunkd.ready r GROUP BY r.kind
    UNION ALL
    SELECT s.kind, 'scheduled', count(*) FROM chunkd.scheduled s GROUP BY s.kind
    UNION ALL
    SELECT j.kind, 'processing', count(*)
    FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id
    WHERE a.ended_at IS NULL
    GROUP BY j.kind;
END;

-- Chunks each worker holds now (open attempts), by worker id. Workers holding none are absent.
CREATE FUNCTION chunkd.in_flight_by_worker()
RETURNS TABLE (worker_id text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT a.worker_id, count(*) FROM chunkd.attempts a
    WHERE a.ended_at IS NULL
    GROUP BY a.worker_id;
END;

REVOKE ALL ON FUNCTION chunkd.sync_jobs_page(text, text, int, int) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.sync_job_status_counts(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.queue_depth_by_kind() FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.in_flight_by_worker() FROM PUBLIC;
