-- chunkd schema version 16: retention, and the finished history apart from the live queue.
--
-- Until now nothing removed finished work but `chunkd purge`, a DELETE run by hand that left
-- dead tuples behind in the tables the claim reads. Now a policy per terminal state says how
-- long a finished job is kept (chunkd.retention), and the daemons' maintenance
-- (sql/functions/retention.sql: chunkd.retention_round) moves every row of a finished job out
-- of the live tables into the history tables below, which are partitioned by when their rows
-- expire: expired history goes by dropping whole partitions, never by DELETE.
--
-- The live tables do not change: the claim, the outcomes, the heartbeats and the reaper never
-- read the history. Each history table has every column of its live table (LIKE, so the
-- columns of versions before this one are all there; a later migration that adds a column to a
-- live table adds it here too: tests/test_retention_layout.py fails otherwise) and what
-- reading it needs without the live tables:
--
--   history_jobs      + the job's final overall status
--   history_chunks    + the chunk's final state as chunk_processing_queue shows it, so a read
--                       of the history never needs its attempts
--   history_attempts  the audit trail of every claim
--   history_events    every event of the job, and its audit rows written under schema
--                     version 1 (v1: they go back to events_v1 when the job is restored)
--
-- plus the job's and chunk's public ids, kind and seq where a read needs them (below);
--
-- and the partition key, `expires_at`: the job's finished_at plus its state's policy at the
-- moment it moved. A job's rows all have the same expires_at (a job moved in pieces keeps the
-- first piece's), so they sit in the same partition of each table, and a partition holds rows
-- that expire within its range whatever their state: a failed job kept 30 days never holds a
-- completed job kept 3 days back. Partitions are created by the maintenance when rows need them
-- (CREATE TABLE ... LIKE, then ATTACH: SHARE UPDATE EXCLUSIVE on the parent, which no reader
-- waits for) and dropped once their range is past; chunkd.history_partitions lists them, and
-- chunkd.history_counts counts their jobs by kind and status, so the dashboard's and `chunkd
-- status`'s counts never scan the history.

-- How long a finished job is kept after it finished, per terminal state: completed (every chunk
-- completed), failed (partial_failure: some chunk failed for good), cancelled.
CREATE TABLE chunkd.retention (
    state      text PRIMARY KEY CHECK (state IN ('completed', 'failed', 'cancelled')),
    keep_s     float8 NOT NULL CHECK (keep_s >= 1 AND keep_s <= 3153600000),
    changed_at timestamptz NOT NULL DEFAULT now()
        CONSTRAINT retention_changed_at_finite CHECK (
            changed_at >= '0001-01-01 00:00+00' AND changed_at < '10000-01-01 00:00+00')
);
INSERT INTO chunkd.retention (state, keep_s) VALUES
    ('completed', 3 * 86400), ('cancelled', 7 * 86400), ('failed', 30 * 86400);

-- The partitions of the history tables, by range of expires_at: [from_at, to_at). Each range has
-- one partition in each of the four tables, named <table>_p<suffix>.
CREATE TABLE chunkd.history_partitions (
    from_at    timestamptz PRIMARY KEY
        CONSTRAINT history_partitions_from_at_finite CHECK (
            from_at >= '0001-01-01 00:00+00' AND from_at < '10000-01-01 00:00+00'),
    to_at      timestamptz NOT NULL
        CONSTRAINT history_partitions_to_at_finite CHECK (
            to_at >= '0001-01-01 00:00+00' AND to_at < '10000-01-01 00:00+00'),
    suffix     text NOT NULL UNIQUE CHECK (suffix ~ '^[0-9]{8}t[0-9]{6}$'),
    created_at timestamptz NOT NULL DEFAULT now()
        CONSTRAINT history_partitions_created_at_finite CHECK (
            created_at >= '0001-01-01 00:00+00' AND created_at < '10000-01-01 00:00+00'),
    CHECK (to_at > from_at)
);

-- Jobs in the history, by partition, kind and final status: kept by every statement that adds or
-- removes history (the move, an operator's retry restoring a job, a purge); a partition's rows
-- go with it.
CREATE TABLE chunkd.history_counts (
    from_at timestamptz NOT NULL REFERENCES chunkd.history_partitions ON DELETE CASCADE
        CONSTRAINT history_counts_from_at_finite CHECK (
            from_at >= '0001-01-01 00:00+00' AND from_at < '10000-01-01 00:00+00'),
    kind    text NOT NULL,
    status  text NOT NULL,
    jobs    bigint NOT NULL CHECK (jobs >= 0),
    chunks  bigint NOT NULL CHECK (chunks >= 0),
    PRIMARY KEY (from_at, kind, status)
);

-- Jobs whose rows move in pieces (more chunks than one round moves): the expiry the first piece
-- got (the rest, and the job's row, get the same) and how many chunks have moved; the row goes
-- when the job's row moves.
CREATE TABLE chunkd.history_moving (
    job_id       bigint PRIMARY KEY,
    expires_at   timestamptz NOT NULL
        CONSTRAINT history_moving_expires_at_finite CHECK (
            expires_at >= '0001-01-01 00:00+00' AND expires_at < '10000-01-01 00:00+00'),
    moved_chunks int NOT NULL CHECK (moved_chunks >= 0)
);

CREATE TABLE chunkd.history_jobs (
    LIKE chunkd.jobs INCLUDING CONSTRAINTS,
    status     text NOT NULL CHECK (status IN ('completed', 'partial_failure', 'cancelled')),
    expires_at timestamptz NOT NULL
        CONSTRAINT history_jobs_expires_at_finite CHECK (
            expires_at >= '0001-01-01 00:00+00' AND expires_at < '10000-01-01 00:00+00')
) PARTITION BY RANGE (expires_at);
ALTER TABLE chunkd.history_jobs ALTER COLUMN finished_at SET NOT NULL;
-- The job by its ids (a schedule names its last job by its internal id); the jobs page, newest
-- first, of a kind, of a status. Every index is paid for by each job moved: none more.
CREATE INDEX history_jobs_id ON chunkd.history_jobs (id);
CREATE INDEX history_jobs_public_id ON chunkd.history_jobs (public_id);
CREATE INDEX history_jobs_created ON chunkd.history_jobs (created_at);
CREATE INDEX history_jobs_kind_created ON chunkd.history_jobs (kind, created_at);
CREATE INDEX history_jobs_status_created ON chunkd.history_jobs (status, created_at);
-- The dashboard's search (chunkd.search_sync_jobs): the start of a kind, a label, a dedupe key,
-- as migration 15 indexes the live jobs.
CREATE INDEX history_jobs_kind_search ON chunkd.history_jobs ((lower(kind) COLLATE "C"));
CREATE INDEX history_jobs_label_search ON chunkd.history_jobs ((lower(label) COLLATE "C"))
    WHERE label IS NOT NULL;
CREATE INDEX history_jobs_dedupe_key_search ON chunkd.history_jobs
    ((lower(dedupe_key) COLLATE "C")) WHERE dedupe_key IS NOT NULL;

-- Each history table also holds what reading it needs of the job and the chunk (the job's public
-- id and kind, the chunk's queue id and seq), so that every read of the history is a read of one
-- table through one index: no join whose plan depends on statistics (a partition is read right
-- after it was filled, long before autovacuum first analyzes it).
CREATE TABLE chunkd.history_chunks (
    LIKE chunkd.chunks INCLUDING CONSTRAINTS,
    status        text NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    attempts      int NOT NULL,
    max_attempts  int NOT NULL,
    started_at    timestamptz
        CONSTRAINT history_chunks_started_at_finite CHECK (
            started_at >= '0001-01-01 00:00+00' AND started_at < '10000-01-01 00:00+00'),
    completed_at  timestamptz
        CONSTRAINT history_chunks_completed_at_finite CHECK (
            completed_at >= '0001-01-01 00:00+00' AND completed_at < '10000-01-01 00:00+00'),
    error_message text,
    worker_id     text,
    result        jsonb,
    sync_job_id   uuid NOT NULL,
    kind          text NOT NULL,
    priority      int NOT NULL,
    expires_at    timestamptz NOT NULL
        CONSTRAINT history_chunks_expires_at_finite CHECK (
            expires_at >= '0001-01-01 00:00+00' AND expires_at < '10000-01-01 00:00+00')
) PARTITION BY RANGE (expires_at);
-- A job's chunks in order; a chunk by its queue id; the newest chunks (the seed's check query).
CREATE INDEX history_chunks_job ON chunkd.history_chunks (sync_job_id, seq);
CREATE INDEX history_chunks_queue_id ON chunkd.history_chunks (queue_id);
CREATE INDEX history_chunks_created ON chunkd.history_chunks (created_at);

CREATE TABLE chunkd.history_attempts (
    LIKE chunkd.attempts INCLUDING CONSTRAINTS,
    sync_job_id uuid NOT NULL,
    queue_id    uuid NOT NULL,
    seq         int NOT NULL,
    kind        text NOT NULL,
    expires_at  timestamptz NOT NULL
        CONSTRAINT history_attempts_expires_at_finite CHECK (
            expires_at >= '0001-01-01 00:00+00' AND expires_at < '10000-01-01 00:00+00')
) PARTITION BY RANGE (expires_at);
-- A job's claims, and a chunk's (by its job and seq); a job's errors.
CREATE INDEX history_attempts_job ON chunkd.history_attempts (sync_job_id, seq);
CREATE INDEX history_attempts_errors ON chunkd.history_attempts (sync_job_id)
    WHERE error IS NOT NULL;

-- Without the live table's check of event names: audit rows of schema version 1 are here too.
-- job_kind: the kind of the event's job (`kind` keeps what the live row held).
CREATE TABLE chunkd.history_events (
    LIKE chunkd.events,
    v1          boolean NOT NULL DEFAULT false,
    sync_job_id uuid NOT NULL,
    queue_id    uuid,
    seq         int,
    job_kind    text NOT NULL,
    expires_at  timestamptz NOT NULL
        CONSTRAINT history_events_expires_at_finite CHECK (
            expires_at >= '0001-01-01 00:00+00' AND expires_at < '10000-01-01 00:00+00'),
    CONSTRAINT history_events_at_finite CHECK (
            at >= '0001-01-01 00:00+00' AND at < '10000-01-01 00:00+00')
) PARTITION BY RANGE (expires_at);
-- A job's events, and a chunk's (by its job and seq).
CREATE INDEX history_events_job ON chunkd.history_events (sync_job_id, seq);
