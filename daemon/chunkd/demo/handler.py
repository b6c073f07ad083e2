"""The handler of ``chunkd demo``: pretends to fetch one page of messages from a mailbox.

It behaves like a real IMAP/Graph fetch so that the demo shows what chunkd does with real
work: every page takes a while (50-250 ms), a few pages hit a transient error on their first
attempt (a reset connection, or a rate limit that says when to come back) and are retried,
and the one page that the sample mailbox marks as undecodable fails for good, so the job ends
in ``partial_failure`` without holding up the rest.

Randomness is seeded by the chunk id: a chunk behaves the same on every attempt except that
transient errors strike only the first one, so every run ends with exactly one failed chunk. A
rate limit (``RetryLater``, a snooze: no attempt spent, so the chunk comes back as attempt 1)
strikes a chunk once per process.
The handler is importable as ``chunkd.demo.handler:fetch_messages_page``, so
``chunkd run --handler mailbox-sync=chunkd.demo.handler:fetch_messages_page`` runs it too.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from chunkd.chunk import Chunk, PermanentError, RetryLater

__all__ = ["KIND", "FetchProfile", "fetch_messages_page", "mailbox_chunks", "mailbox_payload"]

KIND = "mailbox-sync"
PAGE_SIZE = 50


@dataclass(frozen=True)
class FetchProfile:
    """How a simulated fetch behaves; the defaults give the demo its ~10-20 s pace."""

    min_delay_s: float = 0.05
    max_delay_s: float = 0.25
    reset_rate: float = 0.03  # first attempts that fail like a dropped IMAP connection
    rate_limit_rate: float = 0.01  # first attempts told "429, come back in 0.5 s"
    rate_limit_retry_s: float = 0.5


PROFILE = FetchProfile()

# Chunks this process told to come back later, until they come back: the simulated rate limit
# strikes once per chunk (a snooze keeps the attempt number, so attempt 1 cannot tell).
_rate_limited: set[UUID] = set()


def mailbox_payload(mailbox: str, pages: int, undecodable_page: int | None) -> dict[str, Any]:
    """The job payload: which mailbox, and (sample data) the page holding a broken message."""
    return {
        "mailbox": mailbox,
        "server": "imap.example.com",
        "folder": "INBOX",
        "pages": pages,
        "page_size": PAGE_SIZE,
        "undecodable_page": undecodable_page,
    }


def mailbox_chunks(mailbox: str, pages: int) -> list[dict[str, Any]]:
    """One chunk per page: "fetch messages page N of mailbox X"."""
    return [
        {
            "task": f"fetch messages page {page} of mailbox {mailbox}",
            "mailbox": mailbox,
            "page": page,
            "offset": page * PAGE_SIZE,
            "limit": PAGE_SIZE,
        }
        for page in range(pages)
    ]


async def fetch_messages_page(chunk: Chunk, profile: FetchProfile = PROFILE) -> dict[str, Any]:
    """Fetch one page: sleep like network I/O, fail the way mail servers fail, report counts."""
    page = int(chunk.payload["page"])
    rng = random.Random(str(chunk.chunk_id))
    await asyncio.sleep(rng.uniform(profile.min_delay_s, profile.max_delay_s))
    if page == chunk.job_payload.get("undecodable_page"):
        raise PermanentError(
            f"page {page}: message {page * PAGE_SIZE + 17} has a malformed MIME header "
            "(retrying cannot fix it)"
        )
    roll = rng.random()
    if chunk.attempt == 1 and roll < profile.reset_rate:
        raise ConnectionResetError(f"page {page}: connection reset by imap.example.com")
    if chunk.attempt == 1 and roll < profile.reset_rate + profile.rate_limit_rate:
        if chunk.chunk_id not in _rate_limited:
            _rate_limited.add(chunk.chunk_id)
            raise RetryLater(profile.rate_limit_retry_s, f"page {page}: 429 too many requests")
        _rate_limited.discard(chunk.chunk_id)
    messages = int(chunk.payload.get("limit", PAGE_SIZE))
    return {
        "page": page,
        "messages": messages,
        "bytes": sum(rng.randint(2_000, 80_000) for _ in range(messages)),
        "idempotency_key": chunk.idempotency_key,
    }
