-- chunkd schema version 10: fair turns across jobs, and how often each daemon heartbeats.
--
-- Turns. The claim ordered ready chunks by (priority, seq): every job's chunk 0, then every
-- job's chunk 1, ... That interleaves jobs enqueued together, but a job enqueued later starts
-- at seq 0 again, ahead of a long job's seq 100: a steady stream of small jobs starved a long
-- one for as long as it lasted. Now each ready chunk carries a `turn` (start-time fair
-- queuing): a job's chunks get turns from the queue's current turn on (the lowest turn waiting
-- at its priority), one per chunk, so each job with runnable chunks is served once per turn
-- (docs/guarantees.md states the bound). Chunks already queued keep their order: turn = seq.
-- Scheduled chunks hold their offset from the turn current when they become due.
--
-- The default 0 serves first what the previous definitions insert between this migration and
-- the new definitions (chunkd migrate applies those right after, in its next transaction).
--
-- Heartbeats. A daemon's workers row says how often it heartbeats (heartbeat_s, NULL for a
-- daemon that does not say): the reaper returns the chunks of a daemon that missed three
-- heartbeats without waiting for each lease, and rows of daemons gone for long are pruned.

LOCK TABLE chunkd.scheduled, chunkd.workers, chunkd.ready IN ACCESS EXCLUSIVE MODE;

ALTER TABLE chunkd.ready ADD COLUMN turn bigint NOT NULL DEFAULT 0;
UPDATE chunkd.ready SET turn = seq;
ALTER TABLE chunkd.scheduled ADD COLUMN turn bigint NOT NULL DEFAULT 0;
UPDATE chunkd.scheduled SET turn = CASE WHEN claims = 0 THEN seq ELSE 0 END;

DROP INDEX chunkd.ready_claim;
-- The fast path's order: priority, then turn, then first come first served within a turn
-- (chunk ids grow with enqueue order, and with seq within a job).
CREATE INDEX ready_claim ON chunkd.ready (priority DESC, turn, chunk_id) WHERE NOT limited;

ALTER TABLE chunkd.workers ADD COLUMN heartbeat_s float8
    CHECK (heartbeat_s IS NULL OR heartbeat_s > 0);
