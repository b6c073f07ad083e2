-- chunkd schema version 15: job labels, and the indexes of the dashboard's search.
--
-- A label is a short text a producer gives a job at enqueue ("invoice run 2026-12", "tenant
-- 42 / inbox") to find it again: the dashboard shows it and searches it. It is set through the
-- job objects of create_sync_jobs and create_jobs (the key "label"), and by the Python client,
-- `chunkd enqueue --label` and chunkd.App.enqueue; create_sync_job keeps its signature (a
-- trailing argument would mean dropping the old function: sql/functions/enqueue.sql says why
-- not). NULL: no label.
--
-- The check is added NOT VALID: the column is new, so every existing row holds NULL and there
-- is nothing to check, while validating would read the whole table under this statement's
-- exclusive lock. New rows are checked as always.
LOCK TABLE chunkd.jobs IN ACCESS EXCLUSIVE MODE;  -- first (docs/migrations.md, The lock order)
ALTER TABLE chunkd.jobs ADD COLUMN label text;
ALTER TABLE chunkd.jobs ADD CONSTRAINT jobs_label_length
    CHECK (label IS NULL OR length(label) BETWEEN 1 AND 200) NOT VALID;

-- The dashboard's search (chunkd.search_sync_jobs) matches a case-insensitive prefix of a
-- job's kind, label or dedupe key as a range of lower(...) in byte order ("C"), which a btree
-- on that expression answers without reading other jobs; a prefix of a job id is a range of
-- public_id, which its unique index answers. The label and dedupe-key indexes are partial, so
-- a job without one costs them nothing; kind, label and dedupe_key never change once a job is
-- written, so the updates of a job's counters stay HOT.
--
-- Each index is built under a SHARE lock on chunkd.jobs, which holds up enqueues and the
-- updates of jobs' counters for as long as the builds read the table. On a large table, build
-- them beforehand with the same statements and CREATE INDEX CONCURRENTLY instead of CREATE
-- INDEX (and check that they are valid); this migration then keeps them (IF NOT EXISTS).
CREATE INDEX IF NOT EXISTS jobs_kind_search ON chunkd.jobs ((lower(kind) COLLATE "C"));
CREATE INDEX IF NOT EXISTS jobs_label_search ON chunkd.jobs ((lower(label) COLLATE "C"))
    WHERE label IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_dedupe_key_search ON chunkd.jobs ((lower(dedupe_key) COLLATE "C"))
    WHERE dedupe_key IS NOT NULL;
