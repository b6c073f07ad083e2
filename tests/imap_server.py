"""A real IMAP server for the tests: Dovecot from Debian's packages on 127.0.0.1, one test user,
and a generated Maildir. ``tests/run.sh`` installs ``dovecot-imapd`` when it is missing; with
``CI`` set, a missing Dovecot fails the run instead of skipping."""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MAIL_USER = "chunkd"
MAIL_PASSWORD = "imap-test-secret"
# The mail files belong to an unprivileged account: Dovecot refuses to run mail as root.
MAIL_ACCOUNT = "nobody"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
"""


@dataclass
class ImapServer:
    host: str
    port: int
    user: str
    password: str
    # folder -> the Message-IDs generated into it
    messages: dict[str, list[str]] = field(default_factory=dict)


def _dovecot_binary() -> str | None:
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot",) if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_maildir(maildir: Path, folders: dict[str, int]) -> dict[str, list[str]]:
    """Maildir++: INBOX at the top, every other folder as ``.Name``."""
    messages: dict[str, list[str]] = {}
    n = 0
    for folder, count in folders.items():
        base = maildir if folder == "INBOX" else maildir / f".{folder}"
        for sub in ("cur", "new", "tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for i in range(count):
            n += 1
            message_id = f"<{folder.lower()}.{i}@chunkd.test>"
            ids.append(message_id)
            body = (
                f"From: Sender {i} <sender{i}@example.test>\r\n"
                f"To: {MAIL_USER}@example.test\r\n"
                f"Subject: {folder} message {i}\r\n"
                f"Date: Mon, 4 May 2026 08:{i % 60:02d}:00 +0000\r\n"
                f"Message-ID: {message_id}\r\n"
                "\r\n"
                f"Body of message {i} in {folder}.\r\n"
            )
            (base / "cur" / f"{1_780_000_000 + n}.M{n}P1.chunkd:2,S").write_text(body)
        messages[folder] = ids
    return messages


def _wait_ready(port: int, log: Path, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client = imaplib.IMAP4("127.0.0.1", port, timeout=2)
            client.logout()
            return
        except OSError:
            if time.monotonic() > deadline:
                text = log.read_text() if log.exists() else "(no log)"
                raise RuntimeError(f"Dovecot did not answer on port {port}:\n{text}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def dovecot(folders: dict[str, int]) -> Iterator[ImapServer]:
    binary = _dovecot_binary()
    if binary is None:
        message = "no Dovecot for the IMAP test (apt-get install dovecot-imapd)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.fail("the IMAP test starts Dovecot, which must start as root", pytrace=False)
    account = pwd.getpwnam(MAIL_ACCOUNT)
    root = Path(tempfile.mkdtemp(prefix="chunkd-imap-"))
    root.chmod(0o755)  # the mail account must reach its home below
    port = _free_port()
    (root / "dovecot.conf").write_text(
        CONFIG.format(root=root, uid=account.pw_uid, gid=account.pw_gid, port=port)
    )
    (root / "passwd").write_text(f"{MAIL_USER}:{{PLAIN}}{MAIL_PASSWORD}\n")
    home = root / "home" / MAIL_USER
    messages = _write_maildir(home / "Maildir", folders)
    for path in [root / "home", *(p for p in (root / "home").rglob("*"))]:
        os.chown(path, account.pw_uid, account.pw_gid)
    with open(root / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [binary, "-F", "-c", str(root / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        _wait_ready(port, root / "dovecot.log")
        yield ImapServer("127.0.0.1", port, MAIL_USER, MAIL_PASSWORD, messages)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        shutil.rmtree(root, ignore_errors=True)
