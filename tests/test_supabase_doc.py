"""docs/supabase.md, followed top to bottom against the test PostgreSQL.

Supabase is not reachable from here, so: the connection string becomes a fresh database's, the
``sync-emails`` URL a local HTTP server that answers like an edge function, and Supabase's API
roles are created when missing. Every ```sql and ```sh block of the guide runs, in order, as a
user would run them (shell blocks share their ``export``s, as in one terminal session).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from chunkd.db import DatabaseError, connect
from daemon_helpers import wait_until
from doc_snippets import blocks, sql_statements
from http_stub import StubHandler

DOC = Path(__file__).resolve().parents[1] / "docs" / "supabase.md"
EXAMPLE_DSN = (
    "postgresql://postgres:<password>@db.<project-ref>.supabase.co:5432/postgres?sslmode=require"
)
EXAMPLE_URL = "https://<project-ref>.supabase.co/functions/v1/sync-emails"
SERVICE_KEY = "test-service-role-key-7f3a9c21e8"
API_ROLES = ("anon", "authenticated", "service_role")


def doc_blocks() -> list[tuple[str, str]]:
    found = blocks(DOC)
    assert not any(b.not_run for b in found), "every snippet of the guide runs"
    return [(b.lang, b.text) for b in found]


# --- the stand-in for the sync-emails edge function -------------------------------------------


@dataclass
class Request:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class EdgeFunction:
    """Answers like the guide's sync-emails: 2xx done, 429/503 with Retry-After, 422 for good."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)


def _handler_class(edge: EdgeFunction) -> type[BaseHTTPRequestHandler]:
    class Handler(StubHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            edge.requests.append(Request(dict(self.headers.items()), body))
            if self.path != "/functions/v1/sync-emails":
                self._reply(404, b"no such function")
            elif self.headers.get("Authorization") != f"Bearer {SERVICE_KEY}":
                self._reply(401, b"missing or wrong service-role key")
            else:
                page = body["payload"]["page"]
                # (By calls, not attempts: a Retry-After snoozes the chunk, same attempt.)
                pages = [r.body.get("payload", {}).get("page") for r in edge.requests]
                first = pages.count(page) == 1
                if page == "gone":
                    self._reply(422, b"mailbox no longer exists")
                elif page == 1 and first:
                    self._reply(429, b"rate limited", {"Retry-After": "1"})
                elif page == 2 and first:
                    self._reply(503, b"upstream IMAP unavailable", {"Retry-After": "0"})
                else:
                    result = json.dumps({"synced": 50, "page": page}).encode()
                    self._reply(200, result, {"Content-Type": "application/json"})

    return Handler


@pytest.fixture
def edge_function() -> Iterator[EdgeFunction]:
    edge = EdgeFunction()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(edge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    edge.url = f"http://127.0.0.1:{server.server_address[1]}/functions/v1/sync-emails"
    try:
        yield edge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- a fresh, empty database standing in for the Supabase project -----------------------------


@pytest.fixture
async def supabase_database(pg_server: Any, empty_database: str) -> str:
    """Not the migrated template: the guide runs `chunkd migrate` itself."""
    admin = await connect(pg_server.admin_dsn)
    try:
        # Supabase's API roles (cluster-wide, created once; NOLOGIN, like on Supabase).
        for role in API_ROLES:
            exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            if not exists:
                await admin.execute(f'CREATE ROLE "{role}" NOLOGIN')
    finally:
        await admin.close()
    return empty_database


# --- running the shell blocks -----------------------------------------------------------------


def _shell_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    if not shutil.which("chunkd", path=bin_dir):
        pytest.fail(f"no chunkd entry point next to {sys.executable}: pip install -e .")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    env.pop("DATABASE_URL", None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SUPABASE_SERVICE_ROLE_KEY=SERVICE_KEY
    )
    return env


def _script(path: Path, exports: list[str], block: str) -> Path:
    path.write_text("set -euo pipefail\n" + "".join(exports) + block, encoding="utf-8")
    return path


def _run_block(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )


def _start_block(script: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            ["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _substitute(text: str, dsn: str, edge: EdgeFunction, job_id: str | None) -> str:
    text = text.replace(EXAMPLE_DSN, dsn).replace(EXAMPLE_URL, edge.url)
    if job_id is not None:
        text = text.replace("<sync-job-id>", job_id)
    leftover = re.findall(r"<[a-z-]+>", text)
    assert not leftover, f"placeholder(s) {leftover} not substituted in:\n{text}"
    return text


def test_guide_has_the_snippets_this_test_runs() -> None:
    languages = [lang for lang, _ in doc_blocks()]
    assert set(languages) <= {"sql", "sh", "ts", "json", "python"}, languages
    assert languages.count("sh") == 2
    assert languages.count("sql") == 6
    text = DOC.read_text(encoding="utf-8")
    assert "not reachable" in text  # the guide says how it is tested
    assert EXAMPLE_DSN in text and EXAMPLE_URL in text


async def test_the_guide_top_to_bottom(
    supabase_database: str, edge_function: EdgeFunction, tmp_path: Path
) -> None:
    dsn = supabase_database
    env = _shell_env()
    conn = await connect(dsn)
    exports: list[str] = []
    job_id: str | None = None
    seen: set[str] = set()
    delayed_ids: list[str] = []
    documented_body = None
    try:
        for index, (lang, raw) in enumerate(doc_blocks()):
            if lang == "json":
                documented_body = json.loads(raw)
                continue
            if lang in ("ts", "python"):
                continue
            block = _substitute(raw, dsn, edge_function, job_id)
            if lang == "sh":
                script = _script(tmp_path / f"block{index}.sh", exports, block)
                if "chunkd run" in block:
                    await _run_daemon_block(script, env, tmp_path, conn, job_id, edge_function)
                    seen.add("run")
                else:
                    done = await asyncio.to_thread(_run_block, script, env)
                    assert done.returncode == 0, done.stdout + done.stderr
                    assert "applied migration(s) 1" in done.stdout
                    assert "chunkd schema is current" in done.stdout
                    seen.add("migrate")
                exports += [ln + "\n" for ln in block.splitlines() if ln.startswith("export ")]
                continue
            for statement in sql_statements(block):
                rows = await conn.fetch(statement)
                job_id = await _check_sql(conn, statement, rows, job_id, seen, delayed_ids)
    finally:
        await conn.close()
    assert seen == {
        "migrate",
        "grants",
        "privileges",
        "enqueue",
        "delayed",
        "run",
        "watch",
        "audit",
    }, seen
    # The documented request body is exactly what the daemon sent.
    assert documented_body is not None
    sent = edge_function.requests[0].body
    assert set(sent) == set(documented_body)
    assert {k: type(v) for k, v in sent.items()} == {k: type(v) for k, v in documented_body.items()}


async def _check_sql(
    conn: Any,
    statement: str,
    rows: list[Any],
    job_id: str | None,
    seen: set[str],
    seen_delayed: list[str],
) -> str | None:
    """The outcome each of the guide's statements promises."""
    if statement.startswith(("GRANT", "REVOKE", "NOTIFY")):
        if statement.startswith("GRANT EXECUTE ON FUNCTION chunkd.create_sync_job"):
            seen.add("grants")
    elif "has_function_privilege" in statement:
        # (ORDER BY a regprocedure sorts by OID: compare as a set of names.)
        assert sorted((r["api_role"], str(r["callable"])) for r in rows) == [
            (
                "service_role",
                "chunkd.create_sync_job(text,jsonb,jsonb,integer,integer,integer,"
                "timestamp with time zone,text,boolean,text,numeric,text,text)",
            ),
            ("service_role", "chunkd.create_sync_jobs(jsonb)"),
            ("service_role", "chunkd.get_sync_job_progress(uuid)"),
        ]
        seen.add("privileges")
    elif "dedupe_key => 'bob@example.com'" in statement:
        # The delayed, keyed job: called twice, one job, scheduled.
        assert await conn.fetchval("SELECT current_user") == "service_role"
        delayed = str(rows[0]["sync_job_id"])
        if "delayed" in seen:
            assert delayed == seen_delayed[0], "the second call returned the first job"
            status = await _as_owner(
                conn,
                "SELECT overall_status FROM chunkd.chunk_processing_status"
                " WHERE parent_sync_job_id = $1",
                uuid.UUID(delayed),
            )
            assert status == "scheduled"
        seen_delayed.append(delayed)
        seen.add("delayed")
    elif "chunkd.create_sync_job(" in statement:
        assert await conn.fetchval("SELECT current_user") == "service_role"
        job_id = str(rows[0]["sync_job_id"])
        # Only that function: the tables stay closed to the role that can enqueue.
        with pytest.raises(DatabaseError, match="permission denied"):
            await conn.fetch("SELECT * FROM chunkd.sync_jobs")
        with pytest.raises(DatabaseError, match="permission denied"):
            await conn.fetch("SELECT chunkd.cancel_sync_job($1)", uuid.UUID(job_id))
        seen.add("enqueue")
    elif statement.startswith("RESET ROLE"):
        for role in ("anon", "authenticated"):
            await conn.execute(f"SET ROLE {role}")
            try:
                with pytest.raises(DatabaseError, match="permission denied"):
                    await conn.fetch("SELECT chunkd.create_sync_job('mail-sync', '[{}]')")
            finally:
                await conn.execute("RESET ROLE")
    elif "FROM chunkd.chunk_processing_queue ORDER BY created_at DESC LIMIT 10" in statement:
        assert len(rows) == 7  # the guide's 4 + 2 delayed chunks, and the test's extra one
    elif statement == "SELECT * FROM chunkd.chunk_processing_status":
        statuses = {str(r["parent_sync_job_id"]): r["overall_status"] for r in rows}
        assert statuses[job_id] == "completed"
        assert sorted(statuses.values()) == ["completed", "partial_failure", "scheduled"]
    elif statement == "SELECT chunkd.cleanup_stuck_chunks()":
        assert rows[0][0] == 0  # the daemon left nothing stuck
    elif "get_sync_job_progress" in statement:
        progress = rows[0][0]
        assert progress["completed_chunks"] == 4 and progress["overall_status"] == "completed"
        seen.add("watch")
    elif "FROM chunkd.chunk_events" in statement:
        events = {r["event"]: r["count"] for r in rows}
        assert events["enqueued"] == 7 and events["completed"] == 4 and events["failed"] == 1
        # The 429 and the 503 with Retry-After: snoozed, no attempt spent.
        assert events["snoozed"] == 2 and "retry_scheduled" not in events
        seen.add("audit")
    return job_id


async def _as_owner(conn: Any, query: str, *args: Any) -> Any:
    """A check the guide's API role may not run, as the owner, back to that role after."""
    await conn.execute("RESET ROLE")
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.execute("SET ROLE service_role")


async def _run_daemon_block(
    script: Path, env: dict[str, str], tmp_path: Path, conn: Any, job_id: str | None, edge: Any
) -> None:
    """`chunkd run` as the guide starts it, until the guide's job is done; then SIGTERM."""
    assert job_id is not None, "the guide enqueues before it starts the daemon"
    log_path = tmp_path / "chunkd-run.log"
    bash = _start_block(script, env, log_path)
    job = uuid.UUID(job_id)
    try:

        async def status_of(job_uuid: uuid.UUID) -> str | None:
            value = await conn.fetchval(
                "SELECT overall_status FROM chunkd.chunk_processing_status"
                " WHERE parent_sync_job_id = $1",
                job_uuid,
            )
            return value if value in ("completed", "partial_failure") else None

        assert (
            await wait_until(lambda: status_of(job), timeout_s=30, what="the guide's job to finish")
            == "completed"
        ), log_path.read_text()
        # Enqueued while the daemon idles: only LISTEN/NOTIFY (not the 30 s poll) wakes it
        # this fast, so this proves the session connection delivers notifications.
        gone = await conn.fetchval(
            "SELECT chunkd.create_sync_job('mail-sync', '[{\"page\": \"gone\"}]')"
        )
        assert (
            await wait_until(lambda: status_of(gone), timeout_s=10, what="the notified job")
            == "partial_failure"
        ), log_path.read_text()
    finally:
        for pid in _children(bash.pid) if bash.poll() is None else []:
            os.kill(pid, signal.SIGTERM)
        try:
            code = bash.wait(30)
        except subprocess.TimeoutExpired:
            bash.kill()
            bash.wait()
            raise
    log_text = log_path.read_text(errors="replace")
    assert code == 0, log_text  # `chunkd run` stopped gracefully on SIGTERM
    assert SERVICE_KEY not in log_text  # the header value is never logged

    rows = await conn.fetch(
        "SELECT seq, status, attempts, result FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1 ORDER BY seq",
        job,
    )
    assert [(r["status"], r["attempts"]) for r in rows] == [
        ("completed", 1),
        ("completed", 1),  # 429 with Retry-After: 1 (snoozed), then 200
        ("completed", 1),  # 503 with Retry-After: 0 (snoozed), then 200
        ("completed", 1),
    ]
    assert [r["result"] for r in rows] == [{"synced": 50, "page": p} for p in range(4)]
    error = await conn.fetchval(
        "SELECT error_message FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        gone,
    )
    assert "HTTP 422" in error and "mailbox no longer exists" in error
    for request in edge.requests:
        assert request.headers["Authorization"] == f"Bearer {SERVICE_KEY}"
        assert request.headers["Idempotency-Key"] == request.body["idempotency_key"]
