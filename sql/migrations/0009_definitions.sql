-- chunkd schema version 9: current definitions, recorded.
--
-- From this version on, functions, views and triggers are no longer restated in versioned
-- migrations: each lives once, in its current form, in the files sql/definitions.txt lists
-- (sql/functions/, sql/views/, sql/triggers/). `chunkd migrate` applies the versioned
-- migrations first, then re-applies every definitions file whose checksum differs from the one
-- recorded here, in one transaction, and records the new checksums. Versioned migrations keep
-- what holds data: tables, columns, indexes, data moves, and the drop of an object that is gone.

SET LOCAL lock_timeout = '60s';

CREATE TABLE chunkd.schema_definitions (
    -- The file, relative to sql/ (functions/claim.sql).
    path        text PRIMARY KEY,
    -- SHA-256 of the file's text as applied, hex.
    checksum    text NOT NULL,
    -- MD5 of the catalog's own text of what the file created (pg_get_functiondef,
    -- pg_get_viewdef, pg_get_triggerdef), right after it was applied: `chunkd doctor` compares
    -- it with the catalog now to find definitions changed by hand.
    fingerprint text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    -- The chunkd version that applied it: a daemon older than this keeps running (a rolling
    -- upgrade), a newer one asks for `chunkd migrate`.
    applied_by  text NOT NULL
);

REVOKE ALL ON chunkd.schema_definitions FROM PUBLIC;
