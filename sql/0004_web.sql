-- chunkd schema version 4: read-only functions for `chunkd web`.
--
-- The dashboard reads through the public views (chunk_processing_status, chunk_processing_queue,
-- chunk_events, sync_jobs, workers) and functions (get_sync_job_progress, queue_depth). Two of
-- its figures cannot be had from those without reading every chunk ever enqueued (the views
-- derive each chunk's state): the live queue by kind, and what each worker holds. These read
-- only live rows (ready, scheduled, open attempts), like queue_depth(), so their cost follows
-- the queue, never the history. Both are STABLE and change nothing; a read-only dashboard role
-- is granted EXECUTE on them (docs/security.md).

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

REVOKE ALL ON FUNCTION chunkd.queue_depth_by_kind() FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.in_flight_by_worker() FROM PUBLIC;
