-- The functions of the triggers in triggers/notify.sql: NOTIFY chunkd when work becomes
-- runnable.

-- NOTIFY when work became runnable: chunks joined the ready queue (enqueue, retry, release,
-- reap, operator retry), a chunk was scheduled for later (the payload is how many seconds until
-- it is due, by the database clock, so a daemon arms a timer instead of polling), or a chunk of
-- a limited job left 'processing' and freed a slot. One notification per statement for
-- inserts; the row trigger on attempts has a WHEN clause that is false for unlimited jobs, so
-- the hot path pays nothing.
CREATE OR REPLACE FUNCTION chunkd.trigger_next_chunk_processing() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_at timestamptz;
BEGIN
    IF TG_TABLE_NAME = 'ready' THEN
        IF EXISTS (SELECT 1 FROM new_rows) THEN
            PERFORM pg_notify('chunkd', '0');
        END IF;
    ELSIF TG_TABLE_NAME = 'scheduled' THEN
        SELECT min(n.run_at) INTO next_at FROM new_rows n;
        IF next_at IS NOT NULL THEN
            PERFORM pg_notify('chunkd',
                              greatest(0, round(extract(epoch FROM next_at - now()), 3))::text);
        END IF;
    ELSE
        PERFORM pg_notify('chunkd', '0');  -- a slot of a limited job was freed
    END IF;
    RETURN NULL;
END;
$$;

-- A delayed job wakes the daemons when it commits: the payload is the seconds until its run_at
-- by the database clock at commit (rounded up to the millisecond, so a timer never fires before
-- the chunks are due), whatever the caller did in its transaction after enqueueing. (The
-- scheduled rows' own NOTIFY counts from the insert.)
CREATE OR REPLACE FUNCTION chunkd.trigger_run_at_notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('chunkd', round(greatest(0, ceil(
        extract(epoch FROM NEW.run_at - clock_timestamp()) * 1000) / 1000), 3)::text);
    RETURN NULL;
END;
$$;
