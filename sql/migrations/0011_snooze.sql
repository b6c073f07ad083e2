-- chunkd schema version 11: snoozes.
--
-- A handler's RetryLater (and the http: handler's answer to Retry-After) ends its claim as
-- 'snoozed': the chunk runs again after the delay asked for, without spending one of the job's
-- max_attempts (like a release, the claim number n grows and the attempt number does not), up
-- to a number of snoozes per chunk (`chunkd run --max-snoozes`). The audit trail keeps each
-- snooze with its delay and its reason (sql/functions/outcomes.sql: chunkd.snooze_attempt).

-- The one table it alters, locked first (docs/migrations.md, The lock order).
LOCK TABLE chunkd.attempts IN ACCESS EXCLUSIVE MODE;

-- The new outcome. NOT VALID: every existing row holds one of the old values, which the new
-- list contains, so there is nothing to check, and validating would read the whole table under
-- this statement's exclusive lock. New and updated rows are checked as before.
ALTER TABLE chunkd.attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE chunkd.attempts ADD CONSTRAINT attempts_outcome_check
    CHECK (outcome IN ('completed', 'failed', 'retry_scheduled', 'reaped', 'released',
                       'cancelled', 'snoozed')) NOT VALID;

-- Seconds from the end of this claim until its chunk could run again: the delay a snooze asked
-- for, or a retry's backoff (NULL for any other outcome, and for attempts ended before version
-- 11). A nullable column without a default: adding it rewrites nothing.
ALTER TABLE chunkd.attempts ADD COLUMN delay_s float8;
