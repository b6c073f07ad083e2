"""myapp's handlers: a mailbox sync page by page (async) and an invoice total (a plain def).

Run them with ``chunkd run myapp.tasks:app`` from this directory; enqueue with
``app.enqueue(conn, "mail-sync", [MailPage(page=0)], payload=Mailbox("ada@example.com"))``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

import chunkd
from chunkd import Chunk

app = chunkd.App()

# The app keeps its own tables in the database chunkd uses (CHUNKD_DSN).
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    mailbox text NOT NULL,
    uid     int  NOT NULL,
    subject text NOT NULL,
    PRIMARY KEY (mailbox, uid)
)
"""
BATCH = 10


@dataclass
class Mailbox:
    address: str


@dataclass
class MailPage:
    page: int
    size: int = 50


async def fetch_messages(address: str, first_uid: int, count: int) -> list[tuple[int, str]]:
    """Stands in for a mail provider's API: messages ``first_uid`` to ``first_uid + count - 1``
    of the mailbox, after the network's latency (MYAPP_PROVIDER_LATENCY_S, default 10 ms)."""
    await asyncio.sleep(float(os.environ.get("MYAPP_PROVIDER_LATENCY_S", "0.01")))
    return [(uid, f"message {uid} for {address}") for uid in range(first_uid, first_uid + count)]


@app.handler("mail-sync", payload=MailPage, job_payload=Mailbox)
async def sync_page(chunk: Chunk[MailPage, Mailbox]) -> dict[str, int]:
    """Stores one page of the mailbox, a batch of messages per transaction. Idempotent: a page
    that runs again (handlers run at least once) upserts the same rows."""
    mailbox, page = chunk.job_payload, chunk.payload
    conn = await asyncpg.connect(os.environ["CHUNKD_DSN"])
    try:
        for first in range(page.page * page.size, (page.page + 1) * page.size, BATCH):
            messages = await fetch_messages(mailbox.address, first, BATCH)
            await conn.executemany(
                "INSERT INTO messages (mailbox, uid, subject) VALUES ($1, $2, $3) "
                "ON CONFLICT (mailbox, uid) DO NOTHING",
                [(mailbox.address, uid, subject) for uid, subject in messages],
            )
    finally:
        await conn.close()
    return {"messages": page.size}


@dataclass
class Invoice:
    number: str
    amounts: list[Decimal]


@dataclass
class TaxRate:
    rate: Decimal


@app.handler("invoice-total", payload=Invoice, job_payload=TaxRate)
def invoice_total(chunk: Chunk[Invoice, TaxRate]) -> dict[str, object]:
    """A plain def (CPU work, or a blocking library): chunkd runs it in a worker thread."""
    net = sum(chunk.payload.amounts, Decimal(0))
    gross = (net * (1 + chunk.job_payload.rate)).quantize(Decimal("0.01"))
    return {"invoice": chunk.payload.number, "net": net, "gross": gross}
