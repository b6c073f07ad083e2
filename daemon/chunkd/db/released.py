"""What the daemon of each released chunkd calls: the functions, views and tables of schema
``chunkd`` named by the daemon's statements in that release's ``sql/queries.sql``.

``chunkd migrate`` refuses a step that drops a function or view while daemons of another
release are alive only when that release's daemon names it (:mod:`chunkd.db.drops`); a daemon
of a version missing here (a newer one, a patched build) may call anything, so every drop is
refused while one runs.

The table is generated from the release commits of this repository with
:func:`daemon_objects`, the rule :func:`chunkd.db.migrate.daemon_functions` applies to this
release's statements (every named block except ``ops_``, ``client_``, ``migrate_``,
``doctor_`` and ``testing_`` ones: the operator's CLI, the Python client, migrations, doctor
and the test helpers; SQL comments left out)::

    git show 415dfcf:sql/queries.sql | python -c "import sys, chunkd.db.released as r; \\
        print(sorted(r.daemon_objects(sys.stdin.read())))"

``tests/test_released_calls.py`` checks each row against ``git show <commit>:sql/queries.sql``
and that every release the changelog dates has one: a release adds its own row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["DAEMON_CALLS", "RELEASE_COMMITS", "daemon_objects"]

#: The last commit of each release (release 0.1.0 had no tag; its changelog date, 2026-11-28).
RELEASE_COMMITS: Mapping[str, str] = {
    "0.1.0": "77c2620a2e56dacdfba22bce682d6712f813ac19",
    "0.2.0": "415dfcf87de7011b402f54eb90c261813f32f13d",
}

#: Release -> the names (without ``chunkd.``) its daemon's statements use.
DAEMON_CALLS: Mapping[str, frozenset[str]] = {
    "0.1.0": frozenset({
        "claim_next_chunk_job_safe", "cleanup_stuck_chunks", "complete_chunks",
        "deregister_worker", "fail_chunk_job_safe", "heartbeat_chunks", "next_due_in",
        "queue_depth", "register_worker", "release_chunks", "schema_migrations",
        "schema_versions", "worker_heartbeat",
    }),
    "0.2.0": frozenset({
        "claim_or_wait", "complete_and_append", "complete_attempts", "deregister_worker",
        "fail_attempt", "fire_schedule", "next_due_in", "next_schedule_at", "plan_schedule",
        "queue_depth", "reap_expired", "register_worker", "release_attempts", "renew_leases",
        "schedules_due", "schema_migrations", "schema_versions", "worker_heartbeat",
    }),
}  # fmt: skip

_BLOCK = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_NOT_THE_DAEMON = ("ops_", "client_", "migrate_", "doctor_", "testing_")


def daemon_objects(queries_sql: str) -> frozenset[str]:
    """The names of schema ``chunkd`` (``claim_or_wait``, ``schema_migrations``) that the
    daemon's named blocks of a ``queries.sql`` text use, comments left out."""
    parts = _BLOCK.split(queries_sql)
    names: set[str] = set()
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if not name.startswith(_NOT_THE_DAEMON):
            sql = re.sub(r"--[^\n]*", "", body)
            names.update(re.findall(r"\bchunkd\.([a-z_][a-z0-9_]*)\b", sql))
    return frozenset(names)
