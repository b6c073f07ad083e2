"""DSNs as users write them: libpq's key=value pairs as well as URIs, a missing DSN named by
the variables that give one, and a key=value DSN's password in no log line or error.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from chunkd.db import connect
from chunkd.demo.cluster import PostgresCluster
from chunkd.dsn import parse_conninfo, to_uri, with_dbname
from daemon_helpers import TESTS_DIR, Daemon
from web_helpers import WebProcess

PW_ROLE = "chunkd_kv_user"
# A space, a quote, a backslash and a slash: everything a key=value value must escape.
PW_SECRET = "Zq7w S3cret'\\/pw"
NO_DSN = "chunkd: error: no database given: pass --dsn, or set CHUNKD_DSN (or DATABASE_URL)\n"


def _chunkd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CHUNKD_DSN", "DATABASE_URL")}
    full_env["PYTHONPATH"] = str(TESTS_DIR)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "chunkd.cli", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=full_env, timeout=60,
    )  # fmt: skip


def _quoted(value: str) -> str:
    """A key=value value in single quotes, with libpq's escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def key_value(uri: str, **extra: str) -> str:
    """The libpq key=value form of one of the tests' URIs (a unix socket or a TCP host)."""
    parts = urlsplit(uri)
    pairs: dict[str, str] = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.hostname:
        pairs["host"] = parts.hostname
    if parts.port:
        pairs["port"] = str(parts.port)
    if parts.username:
        pairs["user"] = parts.username
    if parts.password:
        pairs["password"] = parts.password
    pairs["dbname"] = parts.path.lstrip("/")
    pairs.update(extra)
    return "  ".join(f"{k} = {_quoted(v)}" for k, v in pairs.items())


# --------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------


def test_libpq_key_value_grammar() -> None:
    assert parse_conninfo("host=db  port = 5433\tdbname= app user =chunkd") == {
        "host": "db",
        "port": "5433",
        "dbname": "app",
        "user": "chunkd",
    }
    assert parse_conninfo(r"password='it\'s a \\ secret' options='' application_name=a\ b") == {
        "password": "it's a \\ secret",
        "options": "",
        "application_name": "a b",
    }
    with pytest.raises(ValueError, match="no '=' after the word at character 9"):
        parse_conninfo("host=db nonsense")
    with pytest.raises(ValueError, match="value of password has an opening quote") as raised:
        parse_conninfo("password='never shown")
    assert "never shown" not in str(raised.value)


@pytest.mark.parametrize(
    ("dsn", "uri"),
    [
        (
            "host=db.example port=5433 dbname=app user=chunkd password='p w/@'",
            "postgresql://chunkd:p%20w%2F%40@db.example:5433/app",
        ),
        (
            "host=/run/postgresql dbname=app sslmode=disable",
            "postgresql:///app?host=%2Frun%2Fpostgresql&sslmode=disable",
        ),
        ("host=::1 dbname=app", "postgresql://[::1]/app"),
        (
            "host=a,b port=5432,5433 dbname=app target_session_attrs=read-write",
            "postgresql:///app?host=a%2Cb&port=5432%2C5433&target_session_attrs=read-write",
        ),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgres://u@h/db", "postgres://u@h/db"),
    ],
    ids=["tcp", "unix-socket", "ipv6", "several-hosts", "uri", "uri-postgres"],
)
def test_key_value_becomes_the_uri_that_means_the_same(dsn: str, uri: str) -> None:
    assert to_uri(dsn) == uri


@pytest.mark.parametrize(
    ("dsn", "uri"),
    [
        ("host=/run/pg port=5433 user=postgres dbname=postgres",
         "postgresql://postgres@/other?host=%2Frun%2Fpg&port=5433"),
        ("postgresql://postgres@/postgres?host=/run/pg&port=5433",
         "postgresql://postgres@/other?host=%2Frun%2Fpg&port=5433"),
        ("postgresql://u:p%40w@h:5432/db?sslmode=require", "postgresql://u:p%40w@h:5432/other?sslmode=require"),
        ("postgres://u@h?dbname=db&database=db", "postgres://u@h/other"),
        ("host=h user=u", "postgresql://u@h/other"),
    ],
    ids=["key-value-socket", "uri-socket", "uri-tcp", "uri-query-dbname", "no-dbname"],
)  # fmt: skip
def test_with_dbname_names_another_database_on_the_same_server(dsn: str, uri: str) -> None:
    assert with_dbname(dsn, "other") == uri


# --------------------------------------------------------------------------------------------
# On a real server
# --------------------------------------------------------------------------------------------


async def test_every_command_connects_with_a_key_value_dsn(database) -> None:
    dsn = key_value(database.dsn)
    assert "=" in dsn and "://" not in dsn
    conn = await connect(dsn)  # the library's own entry point, too
    try:
        assert await conn.fetchval("SELECT current_database()") == database.name
    finally:
        await conn.close()
    check = _chunkd("migrate", "--check", "--dsn", dsn)
    assert check.returncode == 0 and check.stdout.startswith("chunkd schema is current"), check
    status = _chunkd("status", env={"CHUNKD_DSN": dsn})
    assert status.returncode == 0, status.stderr
    via_database_url = _chunkd("migrate", "--check", env={"DATABASE_URL": dsn})
    assert via_database_url.returncode == 0, via_database_url.stderr


@pytest.mark.parametrize(
    "command",
    [["status"], ["migrate"], ["run", "--handler", "x=bad_handlers:echo"], ["web"]],
    ids=["status", "migrate", "run", "web"],
)
@pytest.mark.parametrize("empty", [False, True], ids=["unset", "empty"])
def test_a_missing_dsn_names_every_way_to_give_one(command: list[str], empty: bool) -> None:
    env = {"CHUNKD_DSN": "", "DATABASE_URL": ""} if empty else None
    result = _chunkd(*command, env=env)
    assert (result.returncode, result.stderr, result.stdout) == (2, NO_DSN, "")


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[PostgresCluster]:
    """A cluster of our own that asks for passwords (the shared one trusts its socket), with
    a migrated database its password role owns."""
    cluster = PostgresCluster(fsync=False)
    cluster.init()
    assert cluster.base_dir is not None
    hba = cluster.base_dir / "pg_hba_password.conf"
    hba.write_text("local all postgres trust\nlocal all all scram-sha-256\n")
    hba.chmod(0o644)
    cluster.extra_settings = {"hba_file": str(hba), "password_encryption": "scram-sha-256"}
    try:
        cluster.start()

        async def make_role() -> None:
            conn = await connect(cluster.dsn("postgres"))
            try:
                # The password is a bound value of format(): never in the statement's text.
                statement = await conn.fetchval(
                    "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                    PW_ROLE,
                    PW_SECRET,
                )
                await conn.execute(statement)
                await conn.execute(f"CREATE DATABASE kv OWNER {PW_ROLE}")
            finally:
                await conn.close()

        asyncio.run(make_role())
        yield cluster
    finally:
        cluster.cleanup()


def _secret_dsn(cluster: PostgresCluster, password: str) -> str:
    assert cluster.socket_dir is not None
    return (
        f"host={_quoted(str(cluster.socket_dir))} port={cluster.port} dbname=kv "
        f"user={PW_ROLE} password={_quoted(password)}"
    )


def _assert_no_secret(text: str, secret: str) -> None:
    # Nor any word of it, nor it percent-encoded as in a URI.
    for part in (secret, *secret.split(), quote(secret, safe="")):
        assert part not in text, text


async def test_a_key_value_dsns_password_is_never_logged(password_cluster, tmp_path: Path) -> None:
    dsn = _secret_dsn(password_cluster, PW_SECRET)
    migrated = _chunkd("migrate", "--dsn", dsn)
    assert migrated.returncode == 0, migrated.stderr

    daemon = Daemon(dsn, tmp_path / "run.log", "--handler", "x=bad_handlers:echo")
    try:
        started = await daemon.wait_for_event("daemon.starting", timeout_s=20)
        await daemon.wait_for_event("daemon.ready", timeout_s=20)
        assert await daemon.stop() == 0
    finally:
        daemon.kill()
    logged = started["settings"]["dsn"] if "settings" in started else started["dsn"]
    assert logged.startswith(f"postgresql://{PW_ROLE}:***@/kv?host="), logged
    _assert_no_secret(daemon.log_text(), PW_SECRET)

    web = WebProcess(dsn, tmp_path / "web.log", "--port", "0")
    try:
        await web.listening()
        assert await web.stop() == 0
    finally:
        web.kill()
    assert f"{PW_ROLE}:***@" in web.log_text()
    _assert_no_secret(web.log_text(), PW_SECRET)


@pytest.mark.parametrize("command", [["migrate"], ["run", "--handler", "x=bad_handlers:echo"]])
def test_a_wrong_key_value_password_is_one_line_without_it(password_cluster, command) -> None:
    wrong = "Wr0ng-Xk S3cret'\\/x"
    result = _chunkd(*command, "--dsn", _secret_dsn(password_cluster, wrong))
    assert result.returncode == 2, result.stderr  # a configuration error: not restarted
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunkd: error: cannot connect to "), lines
    assert "password authentication failed" in lines[0]
    _assert_no_secret(result.stdout + result.stderr, wrong)
