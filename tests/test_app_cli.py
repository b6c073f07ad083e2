"""``chunkd run module:app`` as a new user runs it: the installed ``chunkd`` command, from the
project's directory (no PYTHONPATH), on examples/app-quickstart; and every bad app spec as one
line (its traceback only at ``--log-level debug``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from daemon_helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "app-quickstart"
CHUNKD = str(Path(sys.executable).with_name("chunkd"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
    env.pop("PYTHONPATH", None)  # the project is found from the working directory, or not
    env.pop("DATABASE_URL", None)
    env.update(extra)
    return env


def _chunkd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHUNKD, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=60
    )


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``chunkd run ARGS`` from examples/app-quickstart, its log in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [CHUNKD, "--log-format", "json", "run", *args],
            cwd=QUICKSTART, env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def _job_done(conn: asyncpg.Connection, job: object) -> bool:
    status = await conn.fetchval(
        "SELECT overall_status FROM chunkd.chunk_processing_status WHERE parent_sync_job_id = $1",
        job,
    )
    return status in ("completed", "partial_failure")


@pytest.mark.parametrize("how", ["argument", "CHUNKD_APP"])
async def test_chunkd_run_module_app_from_the_project_directory(
    conn: asyncpg.Connection, database, tmp_path: Path, how: str
) -> None:  # type: ignore[no-untyped-def]
    plain = await asyncpg.connect(database.dsn)  # the default search_path, as the app's
    try:
        await plain.execute(
            "CREATE TABLE messages (mailbox text, uid int, subject text, "
            "PRIMARY KEY (mailbox, uid))"
        )
    finally:
        await plain.close()
    create = "SELECT chunkd.create_sync_job($1, $2::jsonb, $3::jsonb, max_attempts => 5)"
    mail = await conn.fetchval(
        create, "mail-sync", '[{"page": 0}, {"page": 5, "size": 20}]', '{"address": "ada"}'
    )
    amounts = '[{"number": "A-1", "amounts": [19.99, 0.01]}]'
    invoice = await conn.fetchval(create, "invoice-total", amounts, '{"rate": 0.2}')
    bad = await conn.fetchval(create, "mail-sync", '[{"page": "one"}]', '{"address": "x"}')
    args = ["myapp.tasks:app"] if how == "argument" else []
    env = {"CHUNKD_DSN": database.dsn}
    if how == "CHUNKD_APP":
        env["CHUNKD_APP"] = "myapp.tasks:app"
    daemon = _start([*args, "--poll-interval", "200ms"], env, tmp_path / "daemon.log")
    try:
        for job in (mail, invoice, bad):
            await wait_until(lambda j=job: _job_done(conn, j), timeout_s=30, what=f"job {job}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.wait, 30)
    assert code == 0, (tmp_path / "daemon.log").read_text()
    assert await conn.fetchval("SELECT count(*) FROM public.messages") == 70
    rows = await conn.fetch(
        "SELECT parent_sync_job_id AS job, status, result::text, error_message, attempts "
        "FROM chunkd.chunk_processing_queue ORDER BY created_at, seq"
    )
    by_job = {job: [r for r in rows if r["job"] == job] for job in (mail, invoice, bad)}
    assert [r["result"] for r in by_job[mail]] == ['{"messages": 50}', '{"messages": 20}']
    # The plain def ran in a thread, with exact Decimals.
    assert [r["result"] for r in by_job[invoice]] == [
        '{"net": 20.00, "gross": 24.00, "invoice": "A-1"}'
    ]
    # A payload that does not match its type fails at once, with the validation's message.
    [failed] = by_job[bad]
    assert (failed["status"], failed["attempts"]) == ("failed", 1)
    assert failed["error_message"] == (
        'PermanentError: payload does not match MailPage: wrong value type for field "page" - '
        'should be "int" instead of value "one" of type "str"'
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with apps that go wrong in every way named by issue 23."""
    files = {
        "good.py": """
            import chunkd
            app = chunkd.App()
            not_an_app = print

            @app.handler("k")
            async def handle(chunk):
                return None
        """,
        "envy.py": """
            import os
            GMAIL_API_KEY = os.environ["GMAIL_API_KEY"]
        """,
        "typo.py": """
            import chunkd
            app = chunkd.App()

            @app.handler("k", payload=dict)
            async def handle(chunk):
                return None
        """,
        "plain.py": """
            async def handle(chunk):
                return None
        """,
        "empty.py": """
            import chunkd
            app = chunkd.App()
        """,
        "bare.py": """
            import chunkd
            app = chunkd.App()

            @app.handler
            async def handle(chunk):
                return None
        """,
        "number.py": """
            app = 42
        """,
        "twice.py": """
            import chunkd
            app = chunkd.App()

            @app.handler("k")
            async def one(chunk): ...

            @app.handler("k")
            async def two(chunk): ...
        """,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["nosuch.module:app"],
         "cannot import app module 'nosuch.module': ModuleNotFoundError: No module named "
         "'nosuch' (looked in {dir} and the installed packages; see --app-dir)"),
        (["good"], "app 'good' is not module:attribute (e.g. myapp.tasks:app)"),
        (["good:ap"], "module 'good' has no app 'ap' (the chunkd.App objects in it: app)"),
        (["good:apps.mail"],
         "module 'good' has no app 'apps.mail' (the chunkd.App objects in it: app)"),
        (["plain:app"],
         "module 'plain' has no app 'app' (it has no chunkd.App: app = chunkd.App() in plain)"),
        (["empty:app"],
         "app 'empty:app' has no handlers: register them with @app.handler(\"kind\") in empty "
         "or in a module it imports"),
        (["empty:app", "--handler", "k=plain:handle"],
         "app 'empty:app' has no handlers: register them with @app.handler(\"kind\") in empty "
         "or in a module it imports"),
        (["bare:app"],
         "cannot import app module 'bare': TypeError: @app.handler needs the kind it handles: "
         "write @app.handler(\"kind\") above handle, not @app.handler"),
        (["number:app"],
         "app 'number:app' is an int, not a chunkd.App (app = chunkd.App() in number)"),
        (["good:app", "--app-dir", "{dir}/missing"],
         "Invalid value for '--app-dir': Directory '{dir}/missing' does not exist."),
        (["good:not_an_app"],
         "app 'good:not_an_app' is a builtin_function_or_method, not a chunkd.App "
         "(app = chunkd.App() in good)"),
        (["envy:app"], "cannot import app module 'envy': KeyError: 'GMAIL_API_KEY'"),
        (["--handler", "k=envy:handle"],
         "cannot import handler module 'envy': KeyError: 'GMAIL_API_KEY'"),
        (["typo:app"],
         "cannot import app module 'typo': TypeError: a payload type must be a dataclass or a "
         "pydantic model class, got <class 'dict'>"),
        (["twice:app"],
         "cannot import app module 'twice': ValueError: kind 'k' already has a handler: "
         "twice:one"),
    ],
)  # fmt: skip
def test_a_bad_app_is_one_line_and_exit_2(
    database, project: Path, args: list[str], line: str
) -> None:  # type: ignore[no-untyped-def]
    args = [arg.format(dir=project) for arg in args]
    done = _chunkd("run", *args, "--dsn", database.dsn, cwd=project)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"chunkd: error: {line.format(dir=project)}\n"


def test_the_import_error_traceback_shows_at_debug(database, project: Path) -> None:  # type: ignore[no-untyped-def]
    done = _chunkd("--log-level", "debug", "run", "envy:app", "--dsn", database.dsn, cwd=project)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert 'GMAIL_API_KEY = os.environ["GMAIL_API_KEY"]' in done.stderr
    assert lines[-1] == "chunkd: error: cannot import app module 'envy': KeyError: 'GMAIL_API_KEY'"


def test_app_dir_puts_another_directory_on_the_import_path(database, project: Path) -> None:  # type: ignore[no-untyped-def]
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    # From another directory the module is not found, with --app-dir it is (and then the DSN
    # is what fails: a database that is not there).
    nowhere = database.server.dsn("no_such_database")
    done = _chunkd("run", "good:app", "--dsn", nowhere, cwd=elsewhere)
    assert "cannot import app module 'good'" in done.stderr
    done = _chunkd("run", "good:app", "--app-dir", "..", "--dsn", nowhere, cwd=elsewhere)
    assert done.returncode == 2
    assert "cannot import" not in done.stderr and "does not exist" in done.stderr, done.stderr


def test_no_app_and_no_handler_says_how_to_give_one(database, project: Path) -> None:  # type: ignore[no-untyped-def]
    done = _chunkd("run", "--dsn", database.dsn, cwd=project)
    assert done.stderr == (
        "chunkd: error: no handlers: pass an app (chunkd run myapp.tasks:app), --handler "
        "KIND=SPEC, or install a chunkd.handlers entry point\n"
    )
