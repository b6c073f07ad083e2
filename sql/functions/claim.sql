-- The claim: the fast path (one statement: delete the picked `ready` rows FOR UPDATE SKIP
-- LOCKED, insert their attempts), the slow path under flow control (claim_flow), the token
-- buckets' arithmetic, and when the next chunk is due.

-- claim_batch and the six-argument claim_flow gained two result columns (claim_n, traceparent)
-- before their first release. A result type cannot change in place (CREATE OR REPLACE keeps
-- it): a database that holds their earlier form drops them here, with the two functions whose
-- bodies refer to them, and the transaction that applies this file creates all four again
-- below, so no caller ever finds one missing. A database of chunkd 0.2 has neither: nothing is
-- dropped.
DO $$
BEGIN
    IF EXISTS (
           SELECT 1 FROM pg_catalog.pg_proc p
           WHERE p.oid IN (to_regprocedure('chunkd.claim_batch(text,integer,text[],'
                                           'double precision,double precision,integer)'),
                           to_regprocedure('chunkd.claim_flow(text,integer,text[],'
                                           'timestamp with time zone,double precision,integer)'))
             AND NOT 'traceparent' = ANY (p.proargnames)) THEN
        DROP FUNCTION IF EXISTS chunkd.claim_or_wait(text, int, text[], float8, float8);
        DROP FUNCTION IF EXISTS chunkd.claim_batch(text, int, text[], float8, float8, int);
        DROP FUNCTION IF EXISTS chunkd.claim_flow(text, int, text[], timestamptz, float8);
        DROP FUNCTION IF EXISTS chunkd.claim_flow(text, int, text[], timestamptz, float8, int);
    END IF;
END;
$$;

-- A bucket's level at a moment, at most burst. Claims use one clock reading taken after their
-- locks and their snapshot: it is also their attempts' claimed_at, so the audit trail shows
-- exactly what the buckets and the slot counts saw.
CREATE OR REPLACE FUNCTION chunkd.bucket_level(tokens float8, refilled_at timestamptz, per_second float8,
                                    burst float8, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN least(burst, tokens + per_second
                     * greatest(0, extract(epoch FROM at - refilled_at)::float8));

-- When a throttled claimer should come back: once the bucket holds a quantum (half its burst,
-- at least one token), and not before one quantum after the turn handed out last, so that
-- claimers are spread over the refill instead of all waking at the same instant. A claim every
-- half burst leaves room for a late one before the bucket overflows. At most 100 years ahead
-- (a rate of a chunk per millennium): the turn is stored, and a time past 9999 is not.
CREATE OR REPLACE FUNCTION chunkd.bucket_turn(level float8, wake_at timestamptz, per_second float8,
                                   burst float8, at timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN least(
    at + chunkd.seconds(3155760000),
    greatest(
        at + chunkd.seconds(least(3155760000,
                                  greatest(0, greatest(1, burst / 2) - level) / per_second)),
        coalesce(wake_at, '-infinity')
            + chunkd.seconds(least(3155760000, greatest(1, burst / 2) / per_second))));

-- The slow path, taken while flow control is in use for the claimer's kinds.
--
-- Which chunks may run now, by the limits that apply to each:
--   a job's max_concurrency: the first (max_concurrency - in flight) of its pending chunks in seq
--     order, only those already due (a waiting retry keeps its place);
--   a job's max_per_second: as many as its bucket holds whole tokens;
--   a concurrency key: (limit - in flight over all its unfinished jobs) chunks, in the order
--     below, so the key's jobs take turns;
--   a kind's rate: as many as its bucket holds whole tokens;
--   paused jobs and kinds: none.
-- Then all that remains, and the unlimited chunks of other kinds, are taken by priority and turn
-- (fair across jobs: chunkd.current_turn), up to the batch. Each limit is applied to what passed the ones before, so
-- a chunk held back late can leave an earlier limit under-used for this one claim; never over.
--
-- The work is bounded by the batch, not by how many jobs are under flow control: a first, cheap
-- pass (one index probe per job, no locks) orders the jobs that may have something to run now
-- by priority and their next chunk's turn, keeps no more per key or per kind than that key or
-- kind has room for, and keeps the first batch_size; only those are locked and expanded. Jobs
-- of a concurrency key locked here are all picked again under its lock (a claim that committed
-- meanwhile may have taken a turn the first pass counted on): the key's turns are exact.
--
-- Every limit is checked under the lock of its row, counted in a statement that starts after the
-- lock was taken: concurrent claimers on any number of hosts never exceed one. Job, key and job
-- bucket rows are locked SKIP LOCKED (never wait on another claimer: its NOTIFY, turn or our
-- poll brings us back); kind buckets are waited for, in kind order, so that claimers of one
-- limited kind take turns on its bucket and each learns when the next tokens are due.
CREATE OR REPLACE FUNCTION chunkd.claim_flow(
    p_worker text,
    p_batch int,
    p_kinds text[],
    p_until timestamptz,
    p_waiting_s float8,
    p_slots int
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz,
    wait_s float8
,
    claim_n int,
    traceparent text
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rl_kinds text[] := '{}';        -- rate-limited kinds of this claim, locked
    rl_levels float8[] := '{}';     -- their buckets' levels at p_now
    pool_ids bigint[] := '{}';      -- unfinished jobs under flow control of these kinds
    cand_ids bigint[] := '{}';      -- the jobs this claim looks at (first pass), and every
                                    -- unfinished job of the concurrency keys it saw (re-picked)
    room_keys text[] := '{}';       -- the room the first pass saw per key and per kind: the
    room_key_n bigint[] := '{}';    -- pick takes no more (a slot freed meanwhile is claimed
    room_kinds text[] := '{}';      -- on its NOTIFY), so a key's or a kind's jobs take turns
    room_kind_n bigint[] := '{}';   -- even when more room appeared
    mc_ids bigint[] := '{}';        -- of those, the max_concurrency jobs, locked
    key_names text[] := '{}';       -- their concurrency keys with a limit, locked
    jr_ids bigint[] := '{}';        -- their jobs with their own rate, buckets locked
    jr_levels float8[] := '{}';
    free_kinds text[];              -- these kinds without a pause or a rate (NULL: all such)
    picked bigint[];
    cut_kinds text[];
    cut_jobs bigint[];
    p_now timestamptz;              -- the claim's clock: see the pick below
    n_claimed int;
    n_declined bigint;
    front bigint[];                 -- (priority, turn) of the first chunk under flow control
                                    -- that could run, when no slot can start one now
    turn record;
BEGIN
    -- The lock order every pause and claim follows: the ready table first (a pause holding
    -- SHARE has waited for the claims under way; claims started while it holds it wait for its
    -- commit and see the pause; a pause never waits here for more than 50 ms at a time).
    LOCK TABLE chunkd.ready IN ROW EXCLUSIVE MODE;

    SELECT coalesce(array_agg(b.kind ORDER BY b.kind), '{}') INTO rl_kinds
    FROM (
        SELECT k.kind
        FROM chunkd.kind_flow k
        WHERE k.per_second IS NOT NULL AND k.paused_at IS NULL
          AND (p_kinds IS NULL OR k.kind = ANY (p_kinds))
        ORDER BY k.kind
        FOR NO KEY UPDATE OF k
    ) b;

    -- The claimer's kinds that are neither paused nor rate-limited: their unlimited chunks are
    -- claimed as on the fast path (none at all when there are none, without scanning).
    IF p_kinds IS NOT NULL THEN
        free_kinds := ARRAY(SELECT x FROM unnest(p_kinds) x
                            WHERE NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k WHERE k.kind = x));
    END IF;

    -- The jobs that go through this path: under flow control themselves (jobs_flow_active), or of
    -- a rate-limited kind (jobs_active_kind).
    pool_ids := ARRAY(
        SELECT j.id FROM chunkd.jobs j
        WHERE (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
               OR j.concurrency_key IS NOT NULL OR j.paused_at IS NOT NULL)
          AND j.finished_at IS NULL AND j.cancelled_at IS NULL
          AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
        UNION
        SELECT j.id FROM chunkd.jobs j
        WHERE j.kind = ANY (rl_kinds) AND j.finished_at IS NULL AND j.cancelled_at IS NULL);

    -- First pass, without locks: the jobs that may have a chunk to run now, by what they would
    -- give first. Capacities read here are rechecked under the locks below.
    WITH jobs_in AS (
        SELECT j.id, j.kind, j.priority, j.created_at, j.concurrency_key, j.max_concurrency,
               j.max_per_second
        FROM chunkd.jobs j
        WHERE j.id = ANY (pool_ids) AND j.paused_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
          AND (j.kind = ANY (rl_kinds) OR NOT EXISTS (
                  SELECT 1 FROM chunkd.kind_flow k
                  WHERE k.kind = j.kind AND k.per_second IS NOT NULL))
    ), nexts AS (
        SELECT i.*, n.first_turn
        FROM jobs_in i
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN i.max_concurrency IS NULL THEN
                    (SELECT r.turn FROM chunkd.ready r WHERE r.job_id = i.id ORDER BY r.seq LIMIT 1)
                ELSE (
                    SELECT min(x.turn) FILTER (WHERE x.due)
                    FROM (
                        SELECT y.turn, y.due FROM (
                            SELECT r.seq, r.turn, true AS due FROM chunkd.ready r
                            WHERE r.job_id = i.id
                            UNION ALL
                            SELECT s.seq, NULL, false FROM chunkd.scheduled s WHERE s.job_id = i.id
                        ) y
                        ORDER BY y.seq
                        LIMIT greatest(0, i.max_concurrency - (
                            SELECT count(*) FROM chunkd.attempts a
                            WHERE a.job_id = i.id AND a.limited AND a.ended_at IS NULL))
                    ) x)
            END AS first_turn
        ) n
        WHERE n.first_turn IS NOT NULL
          AND (i.max_per_second IS NULL OR EXISTS (
                  SELECT 1 FROM chunkd.job_rates jr
                  WHERE jr.job_id = i.id
                    AND chunkd.bucket_level(jr.tokens, jr.refilled_at, jr.per_second, jr.burst,
                                            clock_timestamp()) >= 1))
    ), key_room AS (
        SELECT l.key, l.max_concurrency - (
            SELECT count(*) FROM chunkd.jobs kj
            JOIN chunkd.attempts a ON a.job_id = kj.id AND a.limited AND a.ended_at IS NULL
            WHERE kj.concurrency_key = l.key AND kj.finished_at IS NULL) AS room
        FROM chunkd.concurrency_limits l
        WHERE l.key IN (SELECT n.concurrency_key FROM nexts n)
    ), kind_room AS (
        SELECT k.kind,
               floor(chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp()))::bigint AS room
        FROM chunkd.kind_flow k
        WHERE k.kind = ANY (rl_kinds)
    ), ranked AS (
        SELECT n.id, n.priority, n.first_turn, n.created_at, kr.room AS key_room,
               row_number() OVER (PARTITION BY n.concurrency_key
                                  ORDER BY n.priority DESC, n.first_turn, n.created_at, n.id)
                   AS n_key,
               kd.room AS kind_room,
               row_number() OVER (PARTITION BY n.kind
                                  ORDER BY n.priority DESC, n.first_turn, n.created_at, n.id)
                   AS n_kind
        FROM nexts n
        LEFT JOIN key_room kr ON kr.key = n.concurrency_key
        LEFT JOIN kind_room kd ON kd.kind = n.kind
    )
    SELECT coalesce((SELECT array_agg(c.id) FROM (
                         SELECT r.id FROM ranked r
                         WHERE (r.key_room IS NULL OR r.n_key <= r.key_room)
                           AND (r.kind_room IS NULL OR r.n_kind <= r.kind_room)
                         ORDER BY r.priority DESC, r.first_turn, r.created_at
                         LIMIT p_batch) c), '{}'),
           (SELECT ARRAY[r.priority::bigint, r.first_turn] FROM ranked r
            WHERE (r.key_room IS NULL OR r.n_key <= r.key_room)
              AND (r.kind_room IS NULL OR r.n_kind <= r.kind_room)
            ORDER BY r.priority DESC, r.first_turn, r.created_at
            LIMIT 1),
           coalesce((SELECT array_agg(k.key) FROM key_room k), '{}'),
           coalesce((SELECT array_agg(k.room) FROM key_room k), '{}'),
           coalesce((SELECT array_agg(k.kind) FROM kind_room k), '{}'),
           coalesce((SELECT array_agg(k.room) FROM kind_room k), '{}')
    INTO cand_ids, front, room_keys, room_key_n, room_kinds, room_kind_n;

    -- No slot can start work under flow control now (every chunk claimed would be prefetch):
    -- lock and take none of it, and prefetch only what comes before the first such chunk that
    -- could run, which keeps its turn for a claim with a free slot.
    IF p_slots <= 0 THEN
        cand_ids := '{}';
        room_keys := '{}';
    ELSE
        front := NULL;
    END IF;

    -- The keys' turns are picked again under their locks: every job of the keys seen.
    IF cardinality(room_keys) > 0 THEN
        cand_ids := cand_ids || ARRAY(
            SELECT j.id FROM chunkd.jobs j
            WHERE j.id = ANY (pool_ids) AND j.concurrency_key = ANY (room_keys)
              AND NOT j.id = ANY (cand_ids));
    END IF;

    -- Locks, on the chosen jobs only.
    SELECT coalesce(array_agg(j.id), '{}') INTO mc_ids
    FROM (
        SELECT j.id FROM chunkd.jobs j
        WHERE j.id = ANY (cand_ids) AND j.max_concurrency IS NOT NULL
        ORDER BY j.id
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ) j;

    SELECT coalesce(array_agg(l.key), '{}') INTO key_names
    FROM (
        SELECT c.key FROM chunkd.concurrency_limits c
        WHERE c.key IN (SELECT j.concurrency_key FROM chunkd.jobs j WHERE j.id = ANY (cand_ids))
        ORDER BY c.key
        FOR NO KEY UPDATE OF c SKIP LOCKED
    ) l;

    SELECT coalesce(array_agg(r.job_id ORDER BY r.job_id), '{}') INTO jr_ids
    FROM (
        SELECT r.job_id FROM chunkd.job_rates r
        WHERE r.job_id = ANY (cand_ids)
        ORDER BY r.job_id
        FOR NO KEY UPDATE OF r SKIP LOCKED
    ) r;

    -- What may run now (see above), and which buckets held chunks back. The clock is read once,
    -- after this statement's snapshot: a slot freed by a completion this claim counts on was
    -- freed before it, and every bucket is refilled up to it.
    WITH clock AS MATERIALIZED (
        SELECT clock_timestamp() AS at
    ), kind_level AS (
        SELECT k.kind,
               chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                   c.at) AS level
        FROM chunkd.kind_flow k, clock c
        WHERE k.kind = ANY (rl_kinds)
    ), job_level AS (
        SELECT r.job_id,
               chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst, c.at) AS level
        FROM chunkd.job_rates r, clock c
        WHERE r.job_id = ANY (jr_ids)
    ), cand AS (
        SELECT j.id, j.kind, j.priority, j.created_at, j.max_concurrency, j.concurrency_key,
               floor(jr.level)::int AS rate_cap
        FROM chunkd.jobs j
        LEFT JOIN job_level jr ON jr.job_id = j.id
        WHERE j.id = ANY (cand_ids)
          AND j.paused_at IS NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
          AND (j.max_concurrency IS NULL OR j.id = ANY (mc_ids))
          AND (j.max_per_second IS NULL OR jr.job_id IS NOT NULL)
          AND (j.concurrency_key IS NULL OR j.concurrency_key = ANY (key_names)
               OR NOT EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                              WHERE l.key = j.concurrency_key))
          -- a job of a rate-limited kind only with that kind's bucket in hand
          AND (j.kind = ANY (rl_kinds) OR NOT EXISTS (
                  SELECT 1 FROM chunkd.kind_flow k
                  WHERE k.kind = j.kind AND k.per_second IS NOT NULL))
    ), win AS (
        SELECT c.id AS job_id, c.kind, c.priority, c.created_at, c.concurrency_key, c.rate_cap,
               w.chunk_id, w.seq, w.turn
        FROM cand c
        CROSS JOIN LATERAL (
            SELECT y.chunk_id, y.seq, y.turn, y.due FROM (
                SELECT r.chunk_id, r.seq, r.turn, true AS due FROM chunkd.ready r
                WHERE r.job_id = c.id
                UNION ALL
                SELECT s.chunk_id, s.seq, NULL, false FROM chunkd.scheduled s
                WHERE s.job_id = c.id AND c.max_concurrency IS NOT NULL
            ) y
            ORDER BY y.seq
            LIMIT CASE
                -- one beyond the job's tokens: whether its bucket held chunks back
                WHEN c.max_concurrency IS NULL
                THEN least(p_batch, coalesce(c.rate_cap + 1, p_batch))
                ELSE greatest(0, least(p_batch, c.max_concurrency - (
                    SELECT count(*) FROM chunkd.attempts a
                    WHERE a.job_id = c.id AND a.limited AND a.ended_at IS NULL)))
            END
        ) w
        WHERE w.due
    ), by_job AS (
        SELECT w.*, row_number() OVER (PARTITION BY w.job_id ORDER BY w.seq) AS n_job
        FROM win w
    ), key_free AS (
        SELECT l.key, least(fp.room, l.max_concurrency - (
            SELECT count(*) FROM chunkd.jobs kj
            JOIN chunkd.attempts a ON a.job_id = kj.id AND a.limited AND a.ended_at IS NULL
            WHERE kj.concurrency_key = l.key AND kj.finished_at IS NULL)) AS free
        FROM chunkd.concurrency_limits l
        LEFT JOIN unnest(room_keys, room_key_n) AS fp(key, room) ON fp.key = l.key
        WHERE l.key = ANY (key_names)
    ), by_key AS (
        SELECT x.*, row_number() OVER (PARTITION BY x.concurrency_key
                                       ORDER BY x.priority DESC, x.turn, x.created_at,
                                                x.job_id) AS n_key
        FROM by_job x
        WHERE x.rate_cap IS NULL OR x.n_job <= x.rate_cap
    ), by_kind AS (
        SELECT x.*, row_number() OVER (PARTITION BY x.kind
                                       ORDER BY x.priority DESC, x.turn, x.created_at,
                                                x.job_id) AS n_kind
        FROM by_key x
        LEFT JOIN key_free f ON f.key = x.concurrency_key
        WHERE f.key IS NULL OR x.n_key <= f.free
    ), kind_cap AS (
        SELECT b.kind, least(fp.room, floor(b.level))::int AS cap
        FROM kind_level b
        LEFT JOIN unnest(room_kinds, room_kind_n) AS fp(kind, room) ON fp.kind = b.kind
    ), lim AS (
        SELECT x.chunk_id, x.priority, x.turn
        FROM by_kind x
        LEFT JOIN kind_cap k ON k.kind = x.kind
        WHERE k.kind IS NULL OR x.n_kind <= k.cap
    ), unl AS (
        SELECT q.chunk_id, q.priority, q.turn
        FROM chunkd.ready q
        WHERE NOT q.limited
          AND (p_kinds IS NULL OR cardinality(free_kinds) > 0)
          AND (free_kinds IS NULL OR q.kind = ANY (free_kinds))
          AND q.kind <> ALL (ARRAY(SELECT k.kind FROM chunkd.kind_flow k))
          AND q.job_id <> ALL (ARRAY(
              SELECT j.id FROM chunkd.jobs j
              WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL
                AND j.cancelled_at IS NULL))
          AND (front IS NULL OR q.priority > front[1]
               OR (q.priority = front[1] AND q.turn < front[2]))
        ORDER BY q.priority DESC, q.turn, q.chunk_id
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), ranked_all AS (
        SELECT c.chunk_id, c.limited,
               row_number() OVER (ORDER BY c.priority DESC, c.turn, c.chunk_id) AS rank
        FROM (SELECT x.chunk_id, x.priority, x.turn, true AS limited FROM lim x
              UNION ALL
              SELECT u.chunk_id, u.priority, u.turn, false FROM unl u) c
    ), cutoff AS (
        -- Work under flow control only within the slots that can start now: a prefetched
        -- chunk must not hold a job's or a key's slot, or a rate token, while it waits. Nor is
        -- it passed over by prefetch: the claim stops before the first such chunk it cannot
        -- start, which then keeps its turn for the next claim with a free slot.
        SELECT coalesce(min(c.rank) FILTER (WHERE c.limited AND c.rank > p_slots),
                        p_batch + 1) AS at
        FROM ranked_all c
    ), chosen AS (
        SELECT c.chunk_id FROM ranked_all c, cutoff
        WHERE c.rank <= p_batch AND c.rank < cutoff.at
    )
    SELECT (SELECT array_agg(c.chunk_id) FROM chosen c),
           (SELECT count(*) FROM ranked_all c
            WHERE c.limited AND c.rank <= p_batch AND c.rank > p_slots),
           (SELECT array_agg(DISTINCT x.kind) FROM by_kind x JOIN kind_cap k ON k.kind = x.kind
            WHERE x.n_kind > k.cap),
           (SELECT array_agg(DISTINCT x.job_id) FROM by_job x WHERE x.n_job > x.rate_cap),
           (SELECT coalesce(array_agg(k.level ORDER BY k.kind), '{}') FROM kind_level k),
           (SELECT coalesce(array_agg(j.level ORDER BY j.job_id), '{}') FROM job_level j),
           (SELECT c.at FROM clock c)
    INTO picked, n_declined, cut_kinds, cut_jobs, rl_levels, jr_levels, p_now;

    -- Work under flow control left for a claimer with a free slot: this claim held its job's
    -- row meanwhile (SKIP LOCKED made others pass it by), so wake them when it commits.
    IF n_declined > 0 THEN
        PERFORM pg_notify('chunkd', '0');
    END IF;


    RETURN QUERY
    WITH locked AS (
        SELECT r.ctid FROM chunkd.ready r WHERE r.chunk_id = ANY (picked)
        FOR UPDATE SKIP LOCKED
    ), del AS (
        DELETE FROM chunkd.ready r
        WHERE r.ctid = ANY (ARRAY(SELECT l.ctid FROM locked l))
        RETURNING r.chunk_id, r.job_id, r.seq, r.priority, r.kind, r.claims, r.attempt, r.turn
    ), ins AS (
        -- limited = counts against a concurrency limit (its end frees a slot: NOTIFY)
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     claimed_at, lease_expires_at)
        SELECT d.chunk_id, d.claims + 1, d.attempt + 1, d.job_id,
               j.max_concurrency IS NOT NULL OR j.concurrency_key IS NOT NULL, p_worker, p_now,
               p_until
        FROM del d JOIN chunkd.jobs j ON j.id = d.job_id
    ), started AS (
        UPDATE chunkd.jobs j SET started_at = now()
        WHERE j.id IN (SELECT d.job_id FROM del d) AND j.started_at IS NULL
    ), kind_debit AS (
        UPDATE chunkd.kind_flow k
        SET tokens = b.level - coalesce(u.n, 0), refilled_at = greatest(k.refilled_at, p_now)
        FROM unnest(rl_kinds, rl_levels) AS b(kind, level)
        LEFT JOIN (SELECT d.kind, count(*) AS n FROM del d GROUP BY d.kind) u ON u.kind = b.kind
        WHERE k.kind = b.kind
    ), job_debit AS (
        UPDATE chunkd.job_rates r
        SET tokens = b.level - coalesce(u.n, 0), refilled_at = greatest(r.refilled_at, p_now)
        FROM unnest(jr_ids, jr_levels) AS b(job_id, level)
        LEFT JOIN (SELECT d.job_id, count(*) AS n FROM del d GROUP BY d.job_id) u
               ON u.job_id = b.job_id
        WHERE r.job_id = b.job_id
    )
    SELECT d.chunk_id, c.queue_id, c.chunk_id, j.public_id, d.seq, d.attempt + 1, d.kind,
           c.payload, j.payload, p_until, NULL::float8, d.claims + 1, j.traceparent
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.turn, d.chunk_id;
    GET DIAGNOSTICS n_claimed = ROW_COUNT;

    -- Work under flow control waits for a free slot of this claimer (see cutoff above): say so
    -- (wait_s -1), so the claimer claims again when one of its slots frees.
    IF n_declined > 0 OR front IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint, NULL::uuid, NULL::uuid, NULL::uuid, NULL::int,
                            NULL::int, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                            -1::float8, NULL::int, NULL::text;
        RETURN;
    END IF;
    -- Short of a full batch because a bucket ran dry: say when to come back. The earliest of
    -- those buckets' turns is handed out (and only it is taken, so a claimer short on many
    -- buckets does not hold a turn on each). A claimer that already holds a turn keeps it.
    IF n_claimed >= p_batch OR coalesce(p_waiting_s, 0) > 0 THEN
        RETURN;
    END IF;
    -- The buckets that held chunks back: those cut in the pick, and those so empty that none of
    -- their jobs made the first pass (a kind's rows are locked by this claim, a job's are not).
    SELECT t.kind, t.job_id, t.at INTO turn
    FROM (
        SELECT k.kind, NULL::bigint AS job_id,
               chunkd.bucket_turn(chunkd.bucket_level(k.tokens, k.refilled_at,
                                                      k.per_second::float8, k.burst, p_now),
                                  k.wake_at, k.per_second::float8, k.burst, p_now) AS at
        FROM chunkd.kind_flow k
        WHERE k.kind = ANY (rl_kinds)
          AND (k.kind = ANY (cut_kinds)
               OR (chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                       p_now) < 1
                   AND EXISTS (SELECT 1 FROM chunkd.jobs j
                               WHERE j.kind = k.kind AND j.finished_at IS NULL
                                 AND j.cancelled_at IS NULL AND j.paused_at IS NULL
                                 AND EXISTS (SELECT 1 FROM chunkd.ready r WHERE r.job_id = j.id))))
        UNION ALL
        SELECT NULL, r.job_id,
               chunkd.bucket_turn(chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second,
                                                      r.burst, p_now),
                                  r.wake_at, r.per_second, r.burst, p_now)
        FROM chunkd.job_rates r
        JOIN chunkd.jobs j ON j.id = r.job_id
        WHERE (r.job_id = ANY (cut_jobs)
               OR (chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst, p_now) < 1
                   AND NOT r.job_id = ANY (jr_ids)
                   AND EXISTS (SELECT 1 FROM chunkd.ready x WHERE x.job_id = r.job_id)))
          AND j.max_per_second IS NOT NULL AND j.finished_at IS NULL
          AND j.cancelled_at IS NULL AND j.paused_at IS NULL
          AND (p_kinds IS NULL OR j.kind = ANY (p_kinds))
          AND NOT EXISTS (SELECT 1 FROM chunkd.kind_flow k
                          WHERE k.kind = j.kind AND k.paused_at IS NOT NULL)
    ) t
    ORDER BY t.at
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Only that turn is recorded. A kind's row is locked by this claim already; a job's bucket
    -- is taken only if free (never wait on another claimer).
    IF turn.kind IS NOT NULL THEN
        UPDATE chunkd.kind_flow k SET wake_at = turn.at WHERE k.kind = turn.kind;
    ELSE
        UPDATE chunkd.job_rates r SET wake_at = turn.at
        WHERE r.job_id = (SELECT x.job_id FROM chunkd.job_rates x WHERE x.job_id = turn.job_id
                          FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::uuid, NULL::uuid, NULL::uuid, NULL::int, NULL::int,
                        NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                        greatest(0, extract(epoch FROM turn.at - clock_timestamp()))::float8,
                        NULL::int, NULL::text;
END;
$$;

-- The slow path as chunkd 0.2's claim_or_wait called it (every chunk may start now).
CREATE OR REPLACE FUNCTION chunkd.claim_flow(
    p_worker text,
    p_batch int,
    p_kinds text[],
    p_until timestamptz,
    p_waiting_s float8
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz,
    wait_s float8
)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT f.id, f.queue_id, f.chunk_id, f.sync_job_id, f.seq, f.attempt, f.kind, f.payload,
           f.job_payload, f.lease_expires_at, f.wait_s
    FROM chunkd.claim_flow(p_worker, p_batch, p_kinds, p_until, p_waiting_s, p_batch) f;
END;

-- The daemon's claim. Claimed chunks as claim_chunks returns them (wait_s NULL); and when the
-- claim came back short because a rate limit held chunks back, one more row with id NULL whose
-- wait_s says when to come back (seconds, database clock): the claimer sleeps until then
-- instead of polling. waiting_s: how long until the claimer comes back anyway (a turn it was
-- given before and still holds); then it is given no new turn, so claims made between turns
-- (woken by a NOTIFY) do not push every other claimer's turn back. slots: how many of the
-- batch can start at once (the rest is prefetch, kept ready behind running handlers): chunks
-- under flow control are claimed only within those, so a prefetched chunk never holds a job's
-- max_concurrency slot, a concurrency key's slot or a rate token while it waits. claim_n: this
-- claim's number among the chunk's claims (1: its first delivery; a retry, a snooze, a release
-- or a reap hands it out again); traceparent: its job's W3C trace context (NULL: none). Both
-- for the daemon's tracing (docs/observability.md).
--
-- Fast path: one statement, taken while flow control is not in use for
-- these kinds. That check (flow_in_use) sits inside the statement as a one-time filter, so it
-- reads the same snapshot as the rows it claims: a pause (which takes SHARE on `ready`,
-- conflicting with this statement's ROW EXCLUSIVE) is either seen, or waits for this claim to
-- commit. A function rather than subqueries, so that planning the statement costs what it did.
CREATE OR REPLACE FUNCTION chunkd.claim_batch(
    worker_id text,
    batch_size int,
    kinds text[],
    lease_s float8,
    waiting_s float8,
    slots int
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz,
    wait_s float8
,
    claim_n int,
    traceparent text
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p_worker text := claim_batch.worker_id;
    p_batch int := claim_batch.batch_size;
    p_kinds text[] := claim_batch.kinds;
    p_until timestamptz;
BEGIN
    IF p_worker IS NULL OR length(p_worker) = 0 THEN
        RAISE EXCEPTION 'chunkd: worker_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'chunkd: batch_size must be >= 1, got %', p_batch USING ERRCODE = '22023';
    END IF;
    IF lease_s IS NULL OR NOT lease_s > 0 OR lease_s = 'Infinity' THEN
        RAISE EXCEPTION 'chunkd: lease must be a positive number of seconds' USING ERRCODE = '22023';
    END IF;
    p_until := now() + chunkd.seconds(lease_s);
    PERFORM chunkd.promote_due();

    RETURN QUERY
    WITH del AS (
        -- ctid is safe here: ready rows are never updated, and the lock is held until DELETE.
        DELETE FROM chunkd.ready r
        WHERE r.ctid = ANY (ARRAY(
            SELECT q.ctid FROM chunkd.ready q
            WHERE NOT q.limited AND (p_kinds IS NULL OR q.kind = ANY (p_kinds))
              AND NOT chunkd.flow_in_use(p_kinds)
            ORDER BY q.priority DESC, q.turn, q.chunk_id
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED))
        RETURNING r.chunk_id, r.job_id, r.seq, r.priority, r.kind, r.limited, r.claims, r.attempt,
                  r.turn
    ), ins AS (
        INSERT INTO chunkd.attempts (chunk_id, n, attempt, job_id, limited, worker_id,
                                     lease_expires_at)
        SELECT d.chunk_id, d.claims + 1, d.attempt + 1, d.job_id, d.limited, p_worker, p_until
        FROM del d
    ), started AS (
        UPDATE chunkd.jobs j SET started_at = now()
        WHERE j.id IN (SELECT d.job_id FROM del d) AND j.started_at IS NULL
    )
    SELECT d.chunk_id, c.queue_id, c.chunk_id, j.public_id, d.seq, d.attempt + 1, d.kind,
           c.payload, j.payload, p_until, NULL::float8, d.claims + 1, j.traceparent
    FROM del d
    JOIN chunkd.chunks c ON c.id = d.chunk_id
    JOIN chunkd.jobs j ON j.id = d.job_id
    ORDER BY d.priority DESC, d.turn, d.chunk_id;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Nothing claimed: an empty queue, or flow control in use for these kinds.
    IF NOT chunkd.flow_in_use(p_kinds) THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM chunkd.claim_flow(p_worker, p_batch, p_kinds, p_until, waiting_s,
                                                 coalesce(claim_batch.slots, p_batch));
END;
$$;

-- The claim of chunkd 0.2 (every chunk of the batch may start now), kept for its daemons during
-- a rolling upgrade and for callers in other languages.
-- carry grants: chunkd.claim_or_wait(text,integer,text[],double precision,double precision) -> chunkd.claim_batch(text,integer,text[],double precision,double precision,integer)
CREATE OR REPLACE FUNCTION chunkd.claim_or_wait(
    worker_id text,
    batch_size int,
    kinds text[],
    lease_s float8,
    waiting_s float8 DEFAULT NULL
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz,
    wait_s float8
)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT b.id, b.queue_id, b.chunk_id, b.sync_job_id, b.seq, b.attempt, b.kind, b.payload,
           b.job_payload, b.lease_expires_at, b.wait_s
    FROM chunkd.claim_batch(claim_or_wait.worker_id, claim_or_wait.batch_size,
                            claim_or_wait.kinds, claim_or_wait.lease_s,
                            claim_or_wait.waiting_s, claim_or_wait.batch_size) b;
END;

-- The claim without the wait row, kept (with its grants) for daemons built for schema version
-- 2 during a rolling upgrade, and for callers in other languages: flow control applies to it.
CREATE OR REPLACE FUNCTION chunkd.claim_chunks(
    worker_id text,
    batch_size int,
    kinds text[],
    lease_s float8
) RETURNS TABLE (
    id bigint,
    queue_id uuid,
    chunk_id uuid,
    sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT c.id, c.queue_id, c.chunk_id, c.sync_job_id, c.seq, c.attempt, c.kind, c.payload,
           c.job_payload, c.lease_expires_at
    FROM chunkd.claim_or_wait(claim_chunks.worker_id, claim_chunks.batch_size,
                              claim_chunks.kinds, claim_chunks.lease_s) c
    WHERE c.id IS NOT NULL;
END;
$$;

-- The public claim (the seed's name): as claim_chunks, with the lease as an interval.
CREATE OR REPLACE FUNCTION chunkd.claim_next_chunk_job_safe(
    worker_id text,
    batch_size int DEFAULT 1,
    kinds text[] DEFAULT NULL,
    lease interval DEFAULT '10 minutes'
) RETURNS TABLE (
    queue_id uuid,
    chunk_id uuid,
    parent_sync_job_id uuid,
    seq int,
    attempt int,
    kind text,
    payload jsonb,
    job_payload jsonb,
    lease_expires_at timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION 'chunkd: lease must be a positive interval' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT c.queue_id, c.chunk_id, c.sync_job_id, c.seq, c.attempt, c.kind, c.payload,
           c.job_payload, c.lease_expires_at
    FROM chunkd.claim_chunks(claim_next_chunk_job_safe.worker_id,
                             claim_next_chunk_job_safe.batch_size,
                             claim_next_chunk_job_safe.kinds,
                             chunkd.seconds_of(claim_next_chunk_job_safe.lease)) c;
END;
$$;

-- Seconds until the earliest pending chunk of these kinds is due (database clock), or NULL.
CREATE OR REPLACE FUNCTION chunkd.next_due_in(kinds text[] DEFAULT NULL) RETURNS float8
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM chunkd.ready r
                     WHERE next_due_in.kinds IS NULL OR r.kind = ANY (next_due_in.kinds))
        THEN 0::float8
        ELSE (SELECT greatest(0, extract(epoch FROM min(s.run_at) - now()))::float8
              FROM chunkd.scheduled s
              WHERE next_due_in.kinds IS NULL OR s.kind = ANY (next_due_in.kinds))
    END;
END;
