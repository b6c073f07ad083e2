"""chunkd handlers that sync an IMAP mailbox into PostgreSQL (examples/imap-sync).

Two kinds:

- ``imap_plan`` (the planner, e.g. fired by a schedule): lists the mailbox's folders and creates
  one ``imap_sync`` job per folder, each with ``max_concurrency = 1`` and a single first chunk;
- ``imap_sync``: syncs one page of one folder: the messages with UID >= ``from_uid``, at most
  ``page_size`` of them, upserted into ``imap_messages``; if the folder holds more, it returns
  ``chunkd.Continue`` with the next page (``from_uid`` = last UID + 1). Nobody knows the chunk
  list up front: the job discovers its UID ranges as it goes, and chunkd appends each next
  page atomically with the completion of the current one, fenced, so a stale worker never
  adds a page twice.

Re-running a page is harmless: rows are keyed on (folder, UIDVALIDITY, UID). A folder whose
UIDVALIDITY changed (the server renumbered it) is synced again from UID 1 under the new value.

Configuration: the job payload holds ``host``, ``port``, ``user`` (and optionally ``folder``,
``page_size``, ``page_delay_s``: a pause after each page, to be gentle with the server); the
password comes from the daemon's environment, ``IMAP_SYNC_PASSWORD``, never from the queue;
the table lives in ``IMAP_SYNC_DSN`` (default: the daemon's ``CHUNKD_DSN``).

The IMAP client is the standard library's ``imaplib``, run in a thread: no dependency, kept
with CPython, and a page is one short blocking conversation anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import imaplib
import json
import os
import re
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

import asyncpg

import chunkd
from chunkd import Chunk, Continue, PermanentError

__all__ = ["app", "plan", "sync_folder"]

# `chunkd run imap_sync:app` from this directory runs both handlers.
app = chunkd.App()

DEFAULT_PAGE_SIZE = 200
_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()
_FETCH_META = re.compile(rb"UID (\d+)|RFC822\.SIZE (\d+)")
_HEADERS = "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT FROM DATE)])"

UPSERT = """
INSERT INTO imap_messages (folder, uidvalidity, uid, message_id, subject, sender, sent_date,
                           size_bytes)
SELECT $1, $2, m.uid, m.message_id, m.subject, m.sender, m.sent_date, m.size_bytes
FROM jsonb_to_recordset($3::jsonb) AS m(uid bigint, message_id text, subject text, sender text,
                                         sent_date text, size_bytes int)
ON CONFLICT (folder, uidvalidity, uid) DO UPDATE
SET message_id = EXCLUDED.message_id, subject = EXCLUDED.subject, sender = EXCLUDED.sender,
    sent_date = EXCLUDED.sent_date, size_bytes = EXCLUDED.size_bytes, synced_at = now()
"""


async def _db() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            dsn = os.environ.get("IMAP_SYNC_DSN") or os.environ["CHUNKD_DSN"]
            _pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    return _pool


def _mailbox(name: str) -> str:
    """A folder name as an IMAP quoted string."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _connect(cfg: dict[str, Any]) -> imaplib.IMAP4:
    password = os.environ.get("IMAP_SYNC_PASSWORD")
    if not password:
        raise PermanentError("IMAP_SYNC_PASSWORD is not set in the daemon's environment")
    client = imaplib.IMAP4(cfg["host"], int(cfg.get("port", 143)), timeout=30)
    try:
        client.login(cfg["user"], password)
    except imaplib.IMAP4.error as exc:
        client.shutdown()
        raise PermanentError(f"IMAP login refused for {cfg['user']!r}: {exc}") from None
    return client


def _list_folders(cfg: dict[str, Any]) -> list[str]:
    client = _connect(cfg)
    try:
        _, lines = client.list()
    finally:
        client.logout()
    folders = []
    for line in lines:
        # (\\HasNoChildren) "." "Archive"  or  (\\HasNoChildren) "." INBOX
        text = line.decode() if isinstance(line, bytes) else str(line)
        match = re.match(r'\((?P<flags>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>.+)$', text)
        if match and "\\Noselect" not in match["flags"]:
            name = match["name"]
            if name.startswith('"'):
                name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            folders.append(name)
    return sorted(folders)


def _fetch_page(
    cfg: dict[str, Any], folder: str, from_uid: int, page_size: int
) -> tuple[int, list[dict[str, Any]], int | None]:
    """(UIDVALIDITY, the page's messages, the next page's first UID or None)."""
    client = _connect(cfg)
    try:
        status, _ = client.select(_mailbox(folder), readonly=True)
        if status != "OK":
            raise PermanentError(f"IMAP folder {folder!r} cannot be selected")
        uidvalidity = int(client.response("UIDVALIDITY")[1][0])
        _, found = client.uid("SEARCH", "UID", f"{from_uid}:*")
        # "N:*" always matches the highest UID, even below N: keep only UIDs >= from_uid.
        uids = sorted(u for u in map(int, (found[0] or b"").split()) if u >= from_uid)
        page = uids[:page_size]
        messages = []
        if page:
            _, data = client.uid("FETCH", ",".join(map(str, page)), _HEADERS)
            parser = BytesHeaderParser(policy=default_policy)
            for item in data:
                if not isinstance(item, tuple):
                    continue
                meta = dict.fromkeys(("uid", "size"))
                for uid, size in _FETCH_META.findall(item[0]):
                    if uid:
                        meta["uid"] = int(uid)
                    if size:
                        meta["size"] = int(size)
                headers = parser.parsebytes(item[1])
                messages.append({
                    "uid": meta["uid"],
                    "message_id": str(headers.get("Message-ID", "")).strip() or None,
                    "subject": str(headers.get("Subject", "")) or None,
                    "sender": str(headers.get("From", "")) or None,
                    "sent_date": str(headers.get("Date", "")) or None,
                    "size_bytes": meta["size"],
                })  # fmt: skip
        next_uid = page[-1] + 1 if len(uids) > page_size else None
        return uidvalidity, messages, next_uid
    finally:
        client.logout()


@app.handler("imap_sync")
async def sync_folder(chunk: Chunk) -> Continue:
    """One page of one folder (module docstring)."""
    cfg = {**chunk.job_payload, **chunk.payload}
    folder = cfg.get("folder", "INBOX")
    from_uid = int(cfg.get("from_uid", 1))
    page_size = int(cfg.get("page_size", DEFAULT_PAGE_SIZE))
    uidvalidity, messages, next_uid = await asyncio.to_thread(
        _fetch_page, cfg, folder, from_uid, page_size
    )
    expected = chunk.payload.get("uidvalidity")
    if expected is not None and expected != uidvalidity:
        # Renumbered: sync the folder again under the new UIDVALIDITY.
        return Continue(
            result={"folder": folder, "uidvalidity_changed": [expected, uidvalidity]},
            chunks=[{"from_uid": 1, "uidvalidity": uidvalidity}],
        )
    pool = await _db()
    await pool.execute(UPSERT, folder, uidvalidity, json.dumps(messages))
    if cfg.get("page_delay_s"):
        await asyncio.sleep(float(cfg["page_delay_s"]))
    following = [] if next_uid is None else [{"from_uid": next_uid, "uidvalidity": uidvalidity}]
    return Continue(
        result={"folder": folder, "uidvalidity": uidvalidity, "synced": len(messages)},
        chunks=following,
    )


def _folder_key(cfg: dict[str, Any], folder: str) -> str:
    """One folder of one mailbox, within a dedupe key's 256 characters whatever its name."""
    name = f"{cfg['user']}@{cfg['host']}:{cfg.get('port', 143)}/{folder}"
    return name if len(name) <= 256 else hashlib.sha256(name.encode()).hexdigest()


@app.handler("imap_plan")
async def plan(chunk: Chunk) -> dict[str, Any]:
    """The planner: one ``imap_sync`` job per folder of the mailbox in the job payload.

    A dedupe key per folder: while a folder's sync is still running (a slow first sync, a
    schedule firing every 15 minutes, a re-run of this chunk), no second job for that folder
    is created; ``create_sync_jobs`` returns the running job's id instead.
    """
    cfg = dict(chunk.job_payload)
    folders = await asyncio.to_thread(_list_folders, cfg)
    pool = await _db()
    async with pool.acquire() as conn:
        # One round trip and one transaction for every folder (the client's bulk enqueue).
        ids = await chunkd.create_sync_jobs(
            conn,
            [
                {
                    "kind": "imap_sync",
                    "chunks": [{"from_uid": 1}],
                    "payload": {**cfg, "folder": folder},
                    "max_concurrency": 1,
                    "dedupe_key": _folder_key(cfg, folder),
                }
                for folder in folders
            ],
        )
    return {"jobs": {folder: str(job) for folder, job in zip(folders, ids, strict=True)}}
