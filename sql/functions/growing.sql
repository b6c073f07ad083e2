-- Jobs that grow: a producer appends chunks to an open job, then closes it (continuations
-- append through the outcome writers, functions/outcomes.sql).

-- A producer feeds an open job; returns how many chunks were appended.
CREATE OR REPLACE FUNCTION chunkd.append_chunks(job uuid, chunks jsonb) RETURNS int
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
        -- A finished job (never open) whose rows moved to the history.
        SELECT x.id, false AS open, x.cancelled_at INTO j
        FROM chunkd.history_jobs x WHERE x.public_id = append_chunks.job;
    END IF;
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
CREATE OR REPLACE FUNCTION chunkd.close_sync_job(job uuid) RETURNS boolean
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
        -- A finished job whose rows moved to the history: closed already.
        IF EXISTS (SELECT 1 FROM chunkd.history_jobs x WHERE x.public_id = close_sync_job.job)
        THEN
            RETURN false;
        END IF;
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
