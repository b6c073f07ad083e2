-- What every path that moves chunks shares: a job's status, its counters when chunks become
-- terminal (and the job_finished announcement), requeueing, and promoting due retries.

-- A job's overall status, from its row alone, for the dashboard's functions (a job's counters
-- say everything but pending/processing, which only matter before it finishes); 'paused': an
-- unfinished job that is paused, or whose kind is. The view chunk_processing_status spells the
-- same CASE out: a view's caller needs EXECUTE on every function it calls, and the roles that
-- read the view are granted nothing else. tests/test_web_pages.py holds the two equal.
CREATE OR REPLACE FUNCTION chunkd.overall_status(j chunkd.jobs) RETURNS text
LANGUAGE sql STABLE
RETURN CASE
    WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
    WHEN j.finished_at IS NULL THEN
        CASE WHEN j.paused_at IS NOT NULL
                  OR EXISTS (SELECT 1 FROM chunkd.kind_flow k
                             WHERE k.kind = j.kind AND k.paused_at IS NOT NULL) THEN 'paused'
             WHEN j.started_at IS NOT NULL THEN 'processing'
             WHEN j.run_at > now() THEN 'scheduled'
             ELSE 'pending' END
    WHEN j.failed_chunks > 0 THEN 'partial_failure'
    WHEN j.cancelled_chunks > 0 THEN 'cancelled'
    ELSE 'completed'
END;

-- Adds terminal chunks to their jobs' counters, locking the job rows in id order (two
-- statements ending chunks of the same jobs never deadlock), and stamps finished_at on the
-- jobs whose last chunk this was; an open job is never finished. Callers have already ended the
-- attempts (row locks on attempts are always taken before the job's). The jobs this call
-- finishes are announced: "finished by this call" = finished now, and short of its total before
-- this call's counts (a finished job always has all its chunks terminal).
CREATE OR REPLACE FUNCTION chunkd.count_terminal(job_ids bigint[], completed int[], failed int[],
                                                 cancelled int[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    finished bigint[];
BEGIN
    IF cardinality(job_ids) > 1 THEN
        PERFORM 1 FROM chunkd.jobs j WHERE j.id = ANY (job_ids) ORDER BY j.id
        FOR NO KEY UPDATE;
    END IF;
    WITH u AS (
        UPDATE chunkd.jobs j
        SET completed_chunks = j.completed_chunks + d.completed,
            failed_chunks = j.failed_chunks + d.failed,
            cancelled_chunks = j.cancelled_chunks + d.cancelled,
            finished_at = CASE
                WHEN j.finished_at IS NULL AND NOT j.open
                     AND j.completed_chunks + j.failed_chunks + j.cancelled_chunks
                         + d.completed + d.failed + d.cancelled >= j.total_chunks
                THEN now() ELSE j.finished_at END
        FROM unnest(job_ids, completed, failed, cancelled)
             AS d(job_id, completed, failed, cancelled)
        WHERE j.id = d.job_id
        RETURNING j.id, j.finished_at IS NOT NULL
                  AND j.completed_chunks + j.failed_chunks + j.cancelled_chunks
                      - d.completed - d.failed - d.cancelled < j.total_chunks AS just_finished
    )
    SELECT array_agg(u.id ORDER BY u.id) FILTER (WHERE u.just_finished) INTO finished FROM u;
    IF finished IS NOT NULL THEN
        PERFORM chunkd.announce_finished(finished);
    END IF;
END;
$$;

-- What a finished job tells the world, once per finish, in the finishing transaction: the
-- job_finished audit row, NOTIFY chunkd_job_finished '<job id> <status>', and the on_finish
-- follow-up job (one chunk whose payload is the finished job's id, status and counts).
CREATE OR REPLACE FUNCTION chunkd.announce_finished(job_ids bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record;
    info jsonb;
    follow_id bigint;
    follow_public uuid;
BEGIN
    FOR f IN
        SELECT j.*,
               CASE WHEN j.cancelled_at IS NOT NULL THEN 'cancelled'
                    WHEN j.failed_chunks > 0 THEN 'partial_failure'
                    WHEN j.cancelled_chunks > 0 THEN 'cancelled'
                    ELSE 'completed' END AS status
        FROM chunkd.jobs j WHERE j.id = ANY (job_ids) ORDER BY j.id
    LOOP
        info := jsonb_build_object(
            'sync_job_id', f.public_id, 'kind', f.kind, 'overall_status', f.status,
            'total_chunks', f.total_chunks, 'completed_chunks', f.completed_chunks,
            'failed_chunks', f.failed_chunks, 'cancelled_chunks', f.cancelled_chunks,
            'finished_at', f.finished_at);
        follow_public := NULL;
        IF f.on_finish_kind IS NOT NULL THEN
            INSERT INTO chunkd.jobs (kind, payload, max_attempts, priority, total_chunks)
            VALUES (f.on_finish_kind, f.payload, f.max_attempts, f.priority, 1)
            RETURNING id, public_id INTO follow_id, follow_public;
            WITH c AS (
                INSERT INTO chunkd.chunks (job_id, seq, payload) VALUES (follow_id, 0, info)
                RETURNING id
            )
            INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, turn)
            SELECT c.id, follow_id, 0, f.priority, f.on_finish_kind, false,
                   chunkd.current_turn(f.priority)
            FROM c;
        END IF;
        INSERT INTO chunkd.events (job_id, event, status, attempt, detail)
        VALUES (f.id, 'job_finished', f.status, 0,
                info || jsonb_build_object('on_finish_job_id', follow_public));
        PERFORM pg_notify('chunkd_job_finished', f.public_id::text || ' ' || f.status);
    END LOOP;
END;
$$;

-- The queue's current turn at a priority: the lowest turn waiting there among chunks under no
-- limit, or, when only jobs under flow control wait, the furthest turn one of them reached (0
-- when none waits). Chunks that join the queue get turns from here on, so a job enqueued now
-- is served in the same round as the jobs already waiting, never ahead of a turn they reached,
-- never behind all their chunks (start-time fair queuing: Goyal, Vin and Cheng, SIGCOMM 1996,
-- with one unit per chunk).
--
-- A job held back by its limit (its slot taken, its key full) falls behind the round and keeps
-- its lower turns, so it goes first whenever its limit lets it run; it must not hold the round
-- back: a job enqueued at its turn took every turn in between, ahead of all the jobs under way
-- (334 claims in a row in the chaos soak). Hence the lowest turn of the chunks under no limit;
-- and, when only limited jobs wait, the furthest of their next turns (one probe per such job,
-- as the claim's first pass does), not the lowest: a new job went ahead of a
-- max_concurrency = 1 job that had joined the round later than a held-back one (573 claims).
CREATE OR REPLACE FUNCTION chunkd.current_turn(priority int) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT coalesce(
        (SELECT r.turn FROM chunkd.ready r
         WHERE NOT r.limited AND r.priority = current_turn.priority ORDER BY r.turn LIMIT 1),
        (SELECT max(n.turn)
         FROM chunkd.jobs j
         CROSS JOIN LATERAL (SELECT r.turn FROM chunkd.ready r
                             WHERE r.job_id = j.id ORDER BY r.seq LIMIT 1) n
         WHERE (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
                OR j.concurrency_key IS NOT NULL OR j.paused_at IS NOT NULL)
           AND j.finished_at IS NULL AND j.cancelled_at IS NULL
           AND j.priority = current_turn.priority),
        0);
END;

-- Requeued chunks (a retry, a reap, a release, an operator's retry) keep their job's flow
-- settings (they are immutable; pause is read by the claim, never copied into queue rows) and
-- rejoin at the current turn: one chunk of a job per turn from there, so a job with many
-- chunks back does not go ahead of the others for all of them. Due later, they keep that
-- offset in `scheduled.turn` until promote_due adds the turn current then.
CREATE OR REPLACE FUNCTION chunkd.requeue(chunk_ids bigint[], claims int[], attempts int[],
                                          run_in_s float8[])
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH input AS (
        SELECT i.chunk_id, i.claims, i.attempt, i.run_in_s, c.job_id, c.seq, j.priority, j.kind,
               (j.max_concurrency IS NOT NULL OR j.max_per_second IS NOT NULL
                OR j.concurrency_key IS NOT NULL) AS limited,
               row_number() OVER (PARTITION BY c.job_id, coalesce(i.run_in_s, 0) <= 0
                                  ORDER BY c.seq) - 1 AS offset_
        FROM unnest(chunk_ids, claims, attempts, run_in_s)
             AS i(chunk_id, claims, attempt, run_in_s)
        JOIN chunkd.chunks c ON c.id = i.chunk_id
        JOIN chunkd.jobs j ON j.id = c.job_id
    ), turns AS MATERIALIZED (
        -- Once per priority, not per chunk (see create_jobs).
        SELECT p.priority, chunkd.current_turn(p.priority) AS turn
        FROM (SELECT DISTINCT i.priority FROM input i WHERE coalesce(i.run_in_s, 0) <= 0) p
    ), now_due AS (
        INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, claims, attempt,
                                  turn)
        SELECT i.chunk_id, i.job_id, i.seq, i.priority, i.kind, i.limited, i.claims, i.attempt,
               t.turn + i.offset_
        FROM input i JOIN turns t ON t.priority = i.priority
        WHERE coalesce(i.run_in_s, 0) <= 0
    )
    INSERT INTO chunkd.scheduled (chunk_id, job_id, seq, priority, kind, limited, claims,
                                  attempt, run_at, turn)
    SELECT i.chunk_id, i.job_id, i.seq, i.priority, i.kind, i.limited, i.claims, i.attempt,
           chunkd.due_in(i.run_in_s), i.offset_
    FROM input i WHERE i.run_in_s > 0;
END;

-- Due scheduled chunks join the ready queue (claims call this first; cheap when none is due),
-- at the turn current at their priority plus the offset they hold.
CREATE OR REPLACE FUNCTION chunkd.promote_due() RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int;
BEGIN
    -- The earliest run_at, through its index whatever the statistics say (an EXISTS of due
    -- rows was planned as a scan of the whole table while it had none: every claim read every
    -- waiting retry).
    IF NOT coalesce((SELECT s.run_at FROM chunkd.scheduled s ORDER BY s.run_at LIMIT 1) <= now(),
                    false) THEN
        RETURN 0;
    END IF;
    WITH due AS (
        DELETE FROM chunkd.scheduled s
        WHERE s.ctid = ANY (ARRAY(
            SELECT x.ctid FROM chunkd.scheduled x WHERE x.run_at <= now()
            ORDER BY x.run_at LIMIT 10000 FOR UPDATE SKIP LOCKED))
        RETURNING s.*
    ), turns AS MATERIALIZED (
        SELECT p.priority, chunkd.current_turn(p.priority) AS turn
        FROM (SELECT DISTINCT d.priority FROM due d) p
    ), moved AS (
        INSERT INTO chunkd.ready (chunk_id, job_id, seq, priority, kind, limited, claims, attempt,
                                  turn)
        SELECT d.chunk_id, d.job_id, d.seq, d.priority, d.kind, d.limited, d.claims, d.attempt,
               t.turn + d.turn
        FROM due d JOIN turns t ON t.priority = d.priority
        RETURNING 1
    )
    SELECT count(*) INTO n FROM moved;
    RETURN n;
END;
$$;

-- For tracing (docs/observability.md): job `job` as its job_finished audit row tells it, if it
-- was finished by the transaction that ended worker_id's claim of one of `chunks` (internal
-- chunk ids: the chunks of the job that daemon ran last), and no row otherwise. The daemon that
-- wrote the outcome finishing a traced job, and only that one, so announces it on the job's
-- trace once, however many daemons ran its chunks and heard NOTIFY chunkd_job_finished. One
-- probe of the attempts' primary key per chunk given.
-- carry grants: chunkd.worker_heartbeat(text) -> chunkd.job_finished_by(uuid,text,bigint[])
CREATE OR REPLACE FUNCTION chunkd.job_finished_by(job uuid, worker_id text, chunks bigint[])
RETURNS TABLE (
    kind text,
    overall_status text,
    total_chunks int,
    completed_chunks int,
    failed_chunks int,
    cancelled_chunks int,
    traceparent text
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT j.kind, chunkd.overall_status(j), j.total_chunks, j.completed_chunks, j.failed_chunks,
           j.cancelled_chunks, j.traceparent
    FROM chunkd.jobs j
    WHERE j.public_id = job_finished_by.job AND j.finished_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM chunkd.attempts a
                  WHERE a.chunk_id = ANY (job_finished_by.chunks)
                    AND a.worker_id = job_finished_by.worker_id
                    AND a.ended_at = j.finished_at);
END;
