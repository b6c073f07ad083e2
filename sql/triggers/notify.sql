-- The NOTIFYs that wake the daemons (functions in functions/notify.sql): a chunk joins the
-- ready queue or is scheduled, a chunk of a limited job frees a slot, a delayed job commits.
-- (CREATE OR REPLACE TRIGGER locks the table: these are re-applied only when this file changes.
-- A constraint trigger cannot be replaced, so it is dropped and created.) The tables first, at
-- once, in the lock order of docs/migrations.md: scheduled before the others, as every claim
-- takes it (one that held chunks and jobs waited for ready, which this file held, while this
-- file waited for jobs).
LOCK TABLE chunkd.scheduled, chunkd.attempts, chunkd.jobs, chunkd.ready IN ACCESS EXCLUSIVE MODE;

CREATE OR REPLACE TRIGGER ready_notify
    AFTER INSERT ON chunkd.ready
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

CREATE OR REPLACE TRIGGER scheduled_notify
    AFTER INSERT ON chunkd.scheduled
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

CREATE OR REPLACE TRIGGER attempts_slot_freed
    AFTER UPDATE ON chunkd.attempts
    FOR EACH ROW
    WHEN (NEW.limited AND OLD.ended_at IS NULL AND NEW.ended_at IS NOT NULL)
    EXECUTE FUNCTION chunkd.trigger_next_chunk_processing();

DROP TRIGGER IF EXISTS jobs_run_at_notify ON chunkd.jobs;
CREATE CONSTRAINT TRIGGER jobs_run_at_notify
    AFTER INSERT ON chunkd.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.run_at > NEW.created_at)
    EXECUTE FUNCTION chunkd.trigger_run_at_notify();
