"""The SQL layout: versioned migrations for tables only, every function, view and trigger once
in its current definition, and `chunkd migrate` re-applying exactly the definitions that
changed (docs/migrations.md)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest

from catalog import first_difference, released_migration_files, schema_dump, schema_script
from chunkd.db import connect
from chunkd.db.definitions import apply_definitions, catalog_state, grants_snapshot, successors
from chunkd.db.migrate import apply_migrations, check_version
from chunkd.db.sql_files import definitions, lock_head, migrations
from chunkd.errors import SchemaVersionError
from lock_order import documented_order, lock_problems, locks_taken, split_head

# Databases in the field recorded these: the released files never change.
RELEASED = {
    "0001_queue.sql": "594f3b16be843338dff7f7ad12cd8980b6c548aa6a0990e65875ae3e9aeebba1",
    "0002_storage_v2.sql": "c582373dd9ec70402e72530d6fa3716bf4ab0ce27fd2383f60c4ab49d78a1e70",
    "0003_continuations.sql": "a49493b202c0e6f60ac8b87b2777654819812eb0b4b1650b7a8fbe67ae6cd6e7",
    "0004_web.sql": "5adaafc40752d4641d7274f4fa3380d41bcb97b82a010dcc1c7063e2759858ec",
    "0005_enqueue.sql": "dabe71b021f20f76e4eee2d0efa2ef846a695834bda85f33f900526f8273fa0c",
    "0006_flow_control.sql": "7e55adfb397079d022ab72b527440afb9fa50ee19f9b5a109aa709ed979b82d1",
    "0007_web_flow.sql": "0f43582a4b1b8b22561751693d2348394a756c12e9f1e9b82f2aabc5c3eb4c1a",
    "0008_reap_report.sql": "80dd0835a500092888c71607b93eda21ba2b79a419b5ea457c402e04d3a6bba9",
}
# Created before any migration, with the version table it reads (sql/queries.sql bootstrap).
BOOTSTRAP = {("function", "schema_versions")}
# How the catalog prints a function (regprocedure text): chunkd.name(type,type[],...).
_REGPROCEDURE = r"chunkd\.[a-z_0-9]+\((?:[a-z ]+(?:\[\])?(?:,[a-z ]+(?:\[\])?)*)?\)"
_CREATES = re.compile(
    r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:CONSTRAINT\s+)?(FUNCTION|VIEW|TRIGGER)\s+"
    r"(?:chunkd\.)?([a-z_][a-z0-9_]*)",
    re.IGNORECASE | re.MULTILINE,
)


def test_released_migrations_are_byte_identical() -> None:
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in released_migration_files()}
    assert {name: found.get(name) for name in RELEASED} == RELEASED


def test_no_function_view_or_trigger_is_created_by_a_migration_after_0008() -> None:
    """A definition lives in one place: sql/functions, sql/views or sql/triggers."""
    defined = {(o.kind, o.name) for d in definitions() for o in d.objects}
    for migration in migrations():
        if migration.version <= 8:
            continue
        created = {(k.lower(), n) for k, n in _CREATES.findall(migration.sql)}
        assert not created, (
            f"migration {migration.version} creates {sorted(created)}"
            f"{' (also in the current definitions)' if created & defined else ''}: "
            "functions, views and triggers belong in the current definitions"
        )


def test_a_definition_planted_in_a_later_migration_is_caught() -> None:
    """The check above can fail: the same pattern finds a restated claim function."""
    planted = "-- a restatement\nCREATE OR REPLACE FUNCTION chunkd.claim_chunks(worker text)"
    assert {(k.lower(), n) for k, n in _CREATES.findall(planted)} == {("function", "claim_chunks")}


# A statement that sets a lock timeout (comments aside).
_SETS_LOCK_TIMEOUT = re.compile(r"^[^-\n]*\block_timeout\b", re.IGNORECASE | re.MULTILINE)


def test_no_migration_after_0009_sets_its_own_lock_timeout() -> None:
    """`chunkd migrate` gives each step a lock_timeout of 50 ms and tries it again until
    --lock-wait has passed (docs/migrations.md): a migration's own would override it and queue
    the fleet's claims behind the step. 2, 3 and 5 to 8 (released) and 9 set 60 s, and stay."""
    released = {m.version: m for m in migrations()}
    assert _SETS_LOCK_TIMEOUT.search(released[9].sql), "the pattern finds 0009's"
    for migration in migrations():
        if migration.version <= 9:
            continue
        assert not _SETS_LOCK_TIMEOUT.search(migration.sql), (
            f"migration {migration.version} sets a lock_timeout: leave it to chunkd migrate"
        )


async def test_each_step_takes_its_table_locks_at_once_in_the_documented_order(
    empty_database: str,
) -> None:
    """docs/migrations.md, The lock order: a migration after 0008 (run on a database of the
    version before it) or a definitions file (on a current one) that locks a table more
    strongly than SHARE UPDATE EXCLUSIVE begins with one LOCK TABLE of every table it locks
    that way or writes, in the documented order, in its strongest mode. What each step locks
    is read from pg_locks, its LOCK TABLE left out."""
    order = documented_order()
    problems: list[str] = []
    conn = await connect(empty_database)
    try:
        await apply_migrations(conn, up_to=8)
        for migration in migrations()[8:]:
            head, body = split_head(migration.sql)
            _reads_the_same_head(head, migration.sql)
            taken = await locks_taken(conn, body)
            problems += lock_problems(f"migration {migration.version}", migration.sql, taken, order)
            await apply_migrations(conn, up_to=migration.version)
        await apply_migrations(conn)
        for definition in definitions():
            head, body = split_head(definition.sql)
            _reads_the_same_head(head, definition.sql)
            taken = await locks_taken(conn, body)
            problems += lock_problems(definition.path, definition.sql, taken, order)
        assert await conn.fetchval(
            "SELECT bool_and(to_regclass(t) IS NOT NULL) FROM unnest($1::text[]) t", list(order)
        ), f"the documented order names a table that does not exist: {order}"

        # The check fails a step that alters ready, then scheduled (0010 as it was), one
        # that takes them in another order, and one whose mode is too weak.
        body = (
            "ALTER TABLE chunkd.ready ADD COLUMN x int; UPDATE chunkd.ready SET x = 1;"
            " ALTER TABLE chunkd.scheduled ADD COLUMN x int;"
        )
        taken = await locks_taken(conn, body)
        fix = "LOCK TABLE chunkd.scheduled, chunkd.ready IN ACCESS EXCLUSIVE MODE;"
        assert lock_problems("planted", body, taken, order) == [
            f"planted takes AccessExclusiveLock without a LOCK TABLE first: begin it with {fix}"
        ]
        for head in (
            "LOCK TABLE chunkd.ready, chunkd.scheduled IN ACCESS EXCLUSIVE MODE;",
            "LOCK TABLE chunkd.scheduled, chunkd.ready IN SHARE MODE;",
            "LOCK TABLE chunkd.scheduled IN ACCESS EXCLUSIVE MODE;",
        ):
            assert lock_problems("planted", f"{head}\n{body}", taken, order) == [
                f"planted begins with {head!r}: it should be {fix}"
            ]
        assert lock_problems("planted", f"-- a comment\n{fix}\n{body}", taken, order) == []
    finally:
        await conn.close()
    assert problems == [], "\n".join(problems)


def _reads_the_same_head(head: re.Match[str] | None, sql: str) -> None:
    """chunkd migrate reads the head too, to name the session in the way of its first table."""
    if head is None:
        assert lock_head(sql) is None
        return
    tables = tuple(t.strip() for t in head["tables"].split(","))
    mode = "".join(w.capitalize() for w in head["mode"].split()) + "Lock"
    assert lock_head(sql) == (tables, mode)


async def test_every_function_view_and_trigger_is_in_exactly_one_definition(conn) -> None:
    rows = await conn.fetch(
        "SELECT 'function' AS kind, p.proname AS name FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'chunkd'"
        " UNION SELECT 'view', c.relname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'chunkd'"
        " AND c.relkind = 'v'"
        " UNION SELECT 'trigger', t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'chunkd'"
        " AND NOT t.tgisinternal"
    )
    in_catalog = {(r["kind"], r["name"]) for r in rows} - BOOTSTRAP
    listed = [(o.kind, o.name) for d in definitions() for o in d.objects]
    assert len(listed) == len(set(listed)), "an object is defined in two files"
    assert set(listed) == in_catalog


async def test_definitions_recreate_the_same_catalog_from_nothing_in_manifest_order(
    database,
) -> None:
    """The manifest's order is a dependency order: with every definition dropped, applying
    the files in order rebuilds the catalog exactly (grants and owners included)."""
    before = schema_dump(database.dsn)
    conn = await connect(database.dsn)
    try:
        await conn.execute(
            """
            DO $$ DECLARE v text; f text; BEGIN
              FOREACH v IN ARRAY (SELECT array_agg(c.relname::text) FROM pg_class c
                                  JOIN pg_namespace n ON n.oid = c.relnamespace
                                  WHERE n.nspname = 'chunkd' AND c.relkind = 'v') LOOP
                EXECUTE format('DROP VIEW IF EXISTS chunkd.%I CASCADE', v);
              END LOOP;
              FOREACH f IN ARRAY (SELECT array_agg(p.oid::regprocedure::text) FROM pg_proc p
                                  JOIN pg_namespace n ON n.oid = p.pronamespace
                                  WHERE n.nspname = 'chunkd' AND p.proname <> 'schema_versions')
              LOOP
                EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', f);
              END LOOP;
            END $$"""
        )
        assert (
            await conn.fetchval(
                "SELECT to_regprocedure('chunkd.claim_chunks(text,int,text[],float8)')"
            )
            is None
        )
        migrated = await apply_migrations(conn)
        assert migrated.versions == []
        assert migrated.definitions == tuple(d.path for d in definitions())
    finally:
        await conn.close()
    after = schema_dump(database.dsn)
    assert after == before, first_difference(before, after)


def _migrate(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkd.cli", "migrate", "--dsn", dsn],
        capture_output=True,
        text=True,
        check=False,
    )


async def test_migrate_changes_nothing_when_current_and_applies_one_changed_file_alone(
    database, conn
) -> None:
    unchanged = _migrate(database.dsn)
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout.strip() == "chunkd schema already current: nothing changed"

    # The file as last applied differs from the shipped one (as after an upgrade of chunkd).
    await conn.execute(
        "UPDATE chunkd.schema_definitions SET checksum = 'older' WHERE path = 'functions/claim.sql'"
    )
    with pytest.raises(SchemaVersionError, match=r"functions/claim\.sql changed\): run `chunkd"):
        await check_version(conn)
    changed = _migrate(database.dsn)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == "applied definition(s) functions/claim.sql"
    assert _migrate(database.dsn).stdout.strip().endswith("nothing changed")
    assert (await check_version(conn)).newer_definitions is None

    # A function dropped by hand is missing: its file is applied again, and only its file.
    await conn.execute("DROP FUNCTION chunkd.queue_depth()")
    restored = _migrate(database.dsn)
    assert restored.stdout.strip() == "applied definition(s) functions/progress.sql"
    assert await conn.fetchval("SELECT to_regprocedure('chunkd.queue_depth()')") is not None


async def test_a_restored_dump_or_another_search_path_is_no_hand_edit(
    database, empty_database
) -> None:
    """The fingerprints survive what is not an edit: PostgreSQL prints a BEGIN ATOMIC body
    back differently once it was re-read from its own print (pg_dump and restore), and
    qualifies names as the session's search_path needs (`chunkd doctor`'s role may have
    chunkd in its path)."""
    restored = await connect(empty_database)
    try:
        await restored.execute(schema_script(database.dsn))
        assert (await catalog_state(restored)).edited == ()
        await restored.execute("SET search_path = chunkd, public")
        assert (await catalog_state(restored)).edited == ()
        assert (await catalog_state(restored, through_function=True)).edited == ()
        # A real edit still shows.
        await restored.execute(
            "CREATE OR REPLACE FUNCTION chunkd.queue_depth() RETURNS TABLE"
            " (status text, chunks bigint) LANGUAGE sql STABLE BEGIN ATOMIC"
            " SELECT 'pending'::text, 0::bigint; END"
        )
        assert (await catalog_state(restored)).edited == ("functions/progress.sql",)
    finally:
        await restored.close()


async def test_definitions_of_a_newer_chunkd_let_this_one_run_and_say_so(conn) -> None:
    """A rolling upgrade: a newer chunkd migrated; this (older) daemon keeps running."""
    await conn.execute(
        "UPDATE chunkd.schema_definitions SET checksum = 'newer', applied_by = '99.0.0'"
        " WHERE path = 'functions/outcomes.sql'"
    )
    assert (await check_version(conn)).newer_definitions == "99.0.0"


async def test_a_role_with_only_the_worker_grants_can_check_the_definitions(conn) -> None:
    """schema_definitions() inherits the grants of schema_versions() (a carried grant)."""
    role = "chunkd_layout_worker"
    await conn.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA chunkd TO {role}")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION chunkd.schema_versions() TO {role}")
        await conn.execute("DROP FUNCTION chunkd.schema_definitions()")
        migrated = await apply_migrations(conn)
        assert migrated.definitions == ("functions/schema.sql",)
        assert await conn.fetchval(
            "SELECT has_function_privilege($1, 'chunkd.schema_definitions()', 'EXECUTE')", role
        )
        assert not await conn.fetchval(
            "SELECT has_function_privilege('public', 'chunkd.schema_definitions()', 'EXECUTE')"
        ), "nothing is granted to PUBLIC"
        await conn.execute(f"SET ROLE {role}")
        assert (await check_version(conn)).newer_definitions is None
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_a_view_dropped_and_created_again_gets_its_grants_back(conn) -> None:
    """The view's file is applied again and the view keeps its grants. The function that reads
    it (PL/pgSQL since schema version 16, so no longer dropped with it) keeps its grant and
    reads the new view."""
    role = "chunkd_layout_reader"
    await conn.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role}")
    try:
        await conn.execute(f"GRANT SELECT ON chunkd.chunk_processing_status TO {role}")
        await conn.execute(
            f"GRANT EXECUTE ON FUNCTION chunkd.get_sync_job_progress(uuid) TO {role}"
        )
        grants = await grants_snapshot(conn)
        await conn.execute("DROP VIEW chunkd.chunk_processing_status CASCADE")
        async with conn.transaction():
            applied = await apply_definitions(conn, grants)
        assert applied == ("views/contract.sql",)
        assert await conn.fetchval(
            "SELECT has_table_privilege($1, 'chunkd.chunk_processing_status', 'SELECT')", role
        )
        assert await conn.fetchval(
            "SELECT has_function_privilege($1, 'chunkd.get_sync_job_progress(uuid)', 'EXECUTE')",
            role,
        )
        job = await conn.fetchval("SELECT chunkd.create_sync_job('k', '[{}]')")
        progress = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)", job)
        assert progress["overall_status"] == "pending"
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_every_carried_grant_names_functions_as_the_catalog_prints_them() -> None:
    for d in definitions():
        for carry in d.carries:
            for name in (carry.old, carry.new):
                assert re.fullmatch(
                    r"chunkd\.[a-z_0-9]+\((?:[a-z ]+(?:\[\])?(?:,[a-z ]+(?:\[\])?)*)?\)", name
                ), name


async def test_a_function_carried_to_one_of_its_name_takes_every_call_of_the_old_one(conn) -> None:
    # chunkd migrate lets the old one be dropped while older daemons run (it does not count
    # as a drop) only because of this: the new one's arguments are the old one's, then more,
    # each with a default, so every call of the old one, positional or named, finds it.
    checked = 0
    for old, new in successors().items():
        old_args = old[old.index("(") + 1 : -1].split(",")
        row = await conn.fetchrow(
            "SELECT pg_get_function_identity_arguments(p.oid) AS args, p.pronargs,"
            " p.pronargdefaults, pg_catalog.oidvectortypes(p.proargtypes) AS types"
            " FROM pg_proc p WHERE p.oid = $1::regprocedure",
            new,
        )
        assert row is not None, new
        new_types = [t.strip() for t in row["types"].split(",")]
        assert new_types[: len(old_args)] == old_args, (old, new)
        assert row["pronargdefaults"] >= row["pronargs"] - len(old_args), new
        assert await conn.fetchval("SELECT to_regprocedure($1)", old) is None, f"{old} kept"
        checked += 1
    assert checked >= 1  # create_sync_job gained traceparent
