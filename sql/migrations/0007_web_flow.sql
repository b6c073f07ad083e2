-- chunkd schema version 7: flow control on the dashboard. Two read-only functions for
-- `chunkd web` (and any dashboard), so a read-only role sees what holds a job back without
-- reading the tables:
--
--   job_flow(uuid)          the flow controls that apply to one job: its own pause and rate (with
--                           its bucket's tokens now), its concurrency key's limit and the key's
--                           chunks processing, its kind's pause and rate; one index probe each,
--                           whatever else is in the queue (flow_limits() lists every key and kind);
--   queue_depth_by_kind()   splits the chunks that are due into pending, paused and throttled, as
--                           queue_depth() does since version 6, so the two always add up.
--
-- Roles that run the dashboard's pages (EXECUTE on sync_jobs_page) get EXECUTE on job_flow and
-- SELECT on job_events (a job's pause, resume and job_finished rows), so an upgraded dashboard
-- keeps working under its read-only role. Nothing is granted for the new actions (pause and
-- resume): that is the operator's decision (docs/security.md).

SET LOCAL lock_timeout = '60s';

-- Zero rows for an unknown job. Times by the database clock; tokens as flow_limits() reads them
-- (whole tokens are chunks that may start now).
CREATE FUNCTION chunkd.job_flow(sync_job_id uuid)
RETURNS TABLE (
    paused_at timestamptz,         -- the job's own pause
    max_per_second numeric,        -- the job's own rate
    burst int,
    tokens float8,
    concurrency_key text,
    key_max_concurrency int,       -- NULL: the key has no limit
    key_processing bigint,         -- chunks of the key's unfinished jobs processing now
    kind_paused_at timestamptz,
    kind_per_second numeric,
    kind_burst int,
    kind_tokens float8
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT j.paused_at, j.max_per_second, r.burst::int,
           CASE WHEN r.job_id IS NOT NULL
                THEN chunkd.bucket_level(r.tokens, r.refilled_at, r.per_second, r.burst,
                                         clock_timestamp())
           END,
           j.concurrency_key, l.max_concurrency,
           -- A keyed job is `limited`: its open attempts are in attempts_open_limited.
           CASE WHEN j.concurrency_key IS NOT NULL THEN
               (SELECT count(*) FROM chunkd.jobs o
                JOIN chunkd.attempts a ON a.job_id = o.id AND a.limited AND a.ended_at IS NULL
                WHERE o.concurrency_key = j.concurrency_key AND o.finished_at IS NULL)
           END,
           k.paused_at, k.per_second, k.burst,
           CASE WHEN k.per_second IS NOT NULL
                THEN chunkd.bucket_level(k.tokens, k.refilled_at, k.per_second::float8, k.burst,
                                         clock_timestamp())
           END
    FROM chunkd.jobs j
    LEFT JOIN chunkd.job_rates r ON r.job_id = j.id
    LEFT JOIN chunkd.concurrency_limits l ON l.key = j.concurrency_key
    LEFT JOIN chunkd.kind_flow k ON k.kind = j.kind
    WHERE j.public_id = job_flow.sync_job_id;
END;

-- The live queue by job kind and status: pending (due now and free to run), paused (due, held
-- by a paused job or kind), throttled (due, under a rate limit or a concurrency key's limit),
-- scheduled (waiting for a retry or a later start), processing. Only pairs that have chunks.
-- The same classification as queue_depth(): summed over the kinds, the two are equal.
CREATE OR REPLACE FUNCTION chunkd.queue_depth_by_kind()
RETURNS TABLE (kind text, status text, chunks bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH paused_jobs AS (
        SELECT j.id FROM chunkd.jobs j
        WHERE j.paused_at IS NOT NULL AND j.finished_at IS NULL AND j.cancelled_at IS NULL
    ), due AS (
        SELECT r.kind,
               CASE
                   WHEN k.paused_at IS NOT NULL
                        OR r.job_id = ANY (ARRAY(SELECT p.id FROM paused_jobs p))
                   THEN 'paused'
                   WHEN k.per_second IS NOT NULL
                        OR (r.limited AND (j.max_per_second IS NOT NULL
                                           OR EXISTS (SELECT 1 FROM chunkd.concurrency_limits l
                                                      WHERE l.key = j.concurrency_key)))
                   THEN 'throttled'
                   ELSE 'pending'
               END AS status
        FROM chunkd.ready r
        LEFT JOIN chunkd.kind_flow k ON k.kind = r.kind
        LEFT JOIN chunkd.jobs j ON r.limited AND j.id = r.job_id
    )
    SELECT d.kind, d.status, count(*) FROM due d GROUP BY d.kind, d.status
    UNION ALL
    SELECT s.kind, 'scheduled', count(*) FROM chunkd.scheduled s GROUP BY s.kind
    UNION ALL
    SELECT j.kind, 'processing', count(*)
    FROM chunkd.attempts a JOIN chunkd.jobs j ON j.id = a.job_id
    WHERE a.ended_at IS NULL
    GROUP BY j.kind;
END;

REVOKE ALL ON FUNCTION chunkd.job_flow(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkd.queue_depth_by_kind() FROM PUBLIC;

-- The dashboard's read-only role keeps running every page after the upgrade.
SELECT chunkd.carry_grants('chunkd.sync_jobs_page(text, text, int, int)',
                           'chunkd.job_flow(uuid)');
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT r.rolname
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
        JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
        WHERE f.oid = 'chunkd.sync_jobs_page(text, text, int, int)'::regprocedure
          AND acl.privilege_type = 'EXECUTE' AND acl.grantee <> f.proowner
    LOOP
        EXECUTE format('GRANT SELECT ON chunkd.job_events TO %I', grantee);
    END LOOP;
END;
$$;
