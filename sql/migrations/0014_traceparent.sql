-- chunkd schema version 14: a job carries a W3C traceparent.
--
-- The trace context of whoever enqueued the job (the Python client takes it from the current
-- span; SQL callers pass create_sync_job(..., traceparent => ...); `chunkd enqueue
-- --traceparent`), handed to the daemon by the claim, so each chunk's span joins the
-- enqueuer's trace (docs/observability.md, Tracing). NULL: the job was enqueued outside a
-- trace.
--
-- A nullable column without a default: adding it rewrites nothing. Its check is NOT VALID:
-- every existing row holds NULL, so there is nothing to check, and validating would read the
-- whole table under this statement's exclusive lock. New and updated rows are checked. The
-- same form is checked by chunkd.is_traceparent, which says what is wrong before the insert.
LOCK TABLE chunkd.jobs IN ACCESS EXCLUSIVE MODE;  -- first (docs/migrations.md, The lock order)
ALTER TABLE chunkd.jobs
    ADD COLUMN traceparent text,
    ADD CONSTRAINT jobs_traceparent_w3c CHECK (
        traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND left(traceparent, 2) <> 'ff'
        AND substr(traceparent, 4, 32) <> repeat('0', 32)
        AND substr(traceparent, 37, 16) <> repeat('0', 16)) NOT VALID;
