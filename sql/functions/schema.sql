-- The schema's own bookkeeping, read by roles that may not read its tables.
--
-- (chunkd.schema_versions(), the applied versioned migrations, is created with the version
-- table itself, before any migration runs: the bootstrap in sql/queries.sql.)

-- The definition files applied, their checksums, the fingerprint of what they created and
-- the chunkd version that applied them: `chunkd run` compares them with its own files at
-- start-up, and `chunkd doctor` the fingerprints with the catalog, with only EXECUTE grants.
-- carry grants: chunkd.schema_versions() -> chunkd.schema_definitions()
CREATE OR REPLACE FUNCTION chunkd.schema_definitions()
RETURNS TABLE (path text, checksum text, fingerprint text, applied_by text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT d.path, d.checksum, d.fingerprint, d.applied_by
    FROM chunkd.schema_definitions d ORDER BY d.path;
END;
