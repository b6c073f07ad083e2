-- Helpers every other file uses: exact durations, clipped errors, backoff, the checks of names
-- and rates, operator actions' bounded lock waits, and carry_grants for migrations.

-- Durations are exact seconds. An interval with a day field ('1 day') added to a timestamptz
-- follows the session's TimeZone across a DST change (23 or 25 hours); this one never does.
CREATE OR REPLACE FUNCTION chunkd.seconds(s float8) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN make_interval(secs => s);

CREATE OR REPLACE FUNCTION chunkd.seconds_of(i interval) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN extract(epoch FROM i)::float8;

-- Whether chunkd may store the time `at`: from 0001-01-01 to before 10000-01-01 UTC, the times
-- Python's datetime holds (asyncpg reads a timestamptz as one, in UTC), so the daemon, the CLI,
-- the dashboard and the client can read every time chunkd stores; ±infinity is out. Every
-- timestamp column checks the same range (migration 12: <table>_<column>_finite).
CREATE OR REPLACE FUNCTION chunkd.is_storable_time(at timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN at >= '0001-01-01 00:00+00' AND at < '10000-01-01 00:00+00';

-- When a chunk put back for `run_in_s` seconds is due: now() plus that, refused as a data
-- error (SQLSTATE 22008) when it falls outside the times chunkd stores. The daemon then sends
-- its failure again with the default backoff.
CREATE OR REPLACE FUNCTION chunkd.due_in(run_in_s float8) RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    due timestamptz := now() + chunkd.seconds(run_in_s);
BEGIN
    IF NOT chunkd.is_storable_time(due) THEN
        RAISE EXCEPTION 'chunkd: a retry in % seconds would be due at %, after 9999-12-31 UTC, '
            'the last time chunkd stores', run_in_s, due USING ERRCODE = '22008';
    END IF;
    RETURN due;
END;
$$;

-- Error messages are stored for operators, not as a dump: keep rows small. (Text cannot hold
-- NUL bytes at all; the daemon strips them before it sends an error.)
CREATE OR REPLACE FUNCTION chunkd.clip_error(error text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN left(error, 4000);

-- Exponential backoff with jitter, in seconds: the delay for a retry after `attempt` attempts
-- lies in [d/2, d] with d = least(cap, base * 2^(attempt-1)), so retries of many chunks spread.
CREATE OR REPLACE FUNCTION chunkd.backoff_s(attempt int, base_s float8, cap_s float8) RETURNS float8
LANGUAGE sql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN least(cap_s, base_s * power(2, least(greatest(attempt - 1, 0), 60)))
       * (0.5 + random() * 0.5);

-- The kind and concurrency-key names the flow functions accept (as create_sync_job's kind).
CREATE OR REPLACE FUNCTION chunkd.check_name(what text, name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL OR length(name) = 0 OR length(name) > 200 THEN
        RAISE EXCEPTION 'chunkd: % must be a non-empty text of at most 200 characters', what
            USING ERRCODE = '22023';
    END IF;
    RETURN name;
END;
$$;

CREATE OR REPLACE FUNCTION chunkd.check_rate(what text, per_second numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF per_second IS NOT NULL AND NOT (per_second > 0 AND per_second < 'Infinity') THEN
        RAISE EXCEPTION
            'chunkd: % must be NULL (no limit) or a positive number of chunks per second, got %',
            what, per_second USING ERRCODE = '22023';
    END IF;
    RETURN per_second;
END;
$$;

-- The burst when none is given: a third of a second of the rate, at least one chunk. Any window
-- of T seconds sees at most burst + per_second * T claims: at 20/s, 107 in 5 s (+7 %).
CREATE OR REPLACE FUNCTION chunkd.default_burst(per_second numeric) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN greatest(1, ceil(per_second / 3))::int;

-- An operator action never waits in the lock queue of a table that claims and enqueues write:
-- a lock they would queue behind (SHARE on `ready`) is tried for 50 ms at a time (the action's
-- own lock_timeout; up to 200 ms while the fleet's own claims come and go, see lock_retry), and
-- between tries the fleet goes on. How long the action keeps trying: the setting
-- chunkd.lock_wait, in seconds (default 10; the CLI's and the dashboard's --lock-wait set it
-- for their transaction).
CREATE OR REPLACE FUNCTION chunkd.lock_wait_s() RETURNS float8
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    setting text := current_setting('chunkd.lock_wait', true);
    wait_s float8;
BEGIN
    IF setting IS NULL OR setting = '' THEN
        RETURN 10;
    END IF;
    BEGIN
        wait_s := setting::float8;
    EXCEPTION WHEN invalid_text_representation THEN
        wait_s := NULL;
    END;
    IF wait_s IS NULL OR NOT (wait_s >= 0 AND wait_s <= 3600) THEN
        RAISE EXCEPTION 'chunkd: chunkd.lock_wait must be a number of seconds from 0 to 3600, got %',
            setting USING ERRCODE = '22023';
    END IF;
    RETURN wait_s;
END;
$$;

-- The transactions (virtual ids: a session's next transaction has another) of the other
-- sessions that hold, or wait for, a lock on `rel` in one of `modes`.
CREATE OR REPLACE FUNCTION chunkd.lock_holders(rel regclass, modes text[]) RETURNS text[]
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
RETURN ARRAY(
    SELECT DISTINCT l.virtualtransaction FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.relation = rel AND l.mode = ANY (modes)
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid());

-- Called when try number `tries` of `what` (e.g. 'pause of job ...'), which waited `try_ms`
-- for its locks, timed out; sessions holding `modes` on `rel` are those in its way. Sleeps
-- before the next try (backoff_s: 25 ms doubling to 250-500 ms) and returns how long the next
-- try may wait: 50 ms while a transaction that was in the way before the sleep still is after
-- it (a stuck session: the fleet must never queue behind us for long), twice as long as the last
-- try, up to 200 ms, when all of them have ended (a busy fleet whose claims come and go, each
-- perhaps longer than 50 ms: the claims queued behind the try wait only for those under way).
-- Once chunkd.lock_wait has passed since `started`, raises lock_not_available (55P03) in one
-- line instead. The caller's try ran in a subtransaction, rolled back: it holds nothing of it
-- meanwhile.
CREATE OR REPLACE FUNCTION chunkd.lock_retry(what text, started timestamptz, tries int,
                                             try_ms int, rel regclass, modes text[])
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wait_s float8 := chunkd.lock_wait_s();
    left_s float8 := wait_s - extract(epoch FROM clock_timestamp() - started)::float8;
    before text[];
BEGIN
    IF left_s <= 0 THEN
        RAISE EXCEPTION 'chunkd: % waited % s for locks other transactions hold; nothing was changed',
            what, wait_s
            USING ERRCODE = '55P03',
                  HINT = 'pg_locks and pg_stat_activity show who holds them; the chunkd command '
                         'and the dashboard name the session';
    END IF;
    before := chunkd.lock_holders(rel, modes);
    PERFORM pg_sleep(least(left_s, chunkd.backoff_s(tries, 0.05, 0.5)));
    IF before && chunkd.lock_holders(rel, modes) THEN
        RETURN 50;
    END IF;
    RETURN least(200, try_ms * 2);
END;
$$;

-- A function whose argument list changes is a new function (DROP + CREATE), and the EXECUTE
-- grants operators gave on the old one would be lost with it. Create the new one first, call
-- this, then drop the old one: every role that could execute the old function (directly, not
-- through PUBLIC, which is never granted anything here) can execute the new one, with the
-- grant option where it had it. Returns how many roles it granted. For migrations (run by the
-- owner); nobody else may call it.
CREATE OR REPLACE FUNCTION chunkd.carry_grants(old_function regprocedure, new_function regprocedure)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    grantee record;
    n int := 0;
BEGIN
    FOR grantee IN
        SELECT r.rolname, bool_or(acl.is_grantable) AS grantable
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) acl
        JOIN pg_catalog.pg_roles r ON r.oid = acl.grantee
        WHERE f.oid = old_function AND acl.privilege_type = 'EXECUTE'
          AND acl.grantee <> f.proowner
        GROUP BY r.rolname
        ORDER BY r.rolname
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I%s', new_function, grantee.rolname,
                       CASE WHEN grantee.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;
