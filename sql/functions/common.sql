-- Helpers every other file uses: exact durations, clipped errors, backoff, the checks of names
-- and rates, and carry_grants for migrations.

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
