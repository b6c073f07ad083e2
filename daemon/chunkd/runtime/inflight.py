"""What this process holds: running handlers (slots) and claims whose outcome is not yet written.

The two differ on purpose: a slot frees as soon as the handler returns (so the next chunk need
not wait for a completion batch), but the lease must be renewed until the outcome is committed,
and also while a prefetched chunk waits for a slot.
"""

from __future__ import annotations

from chunkd.db import ClaimedRow

__all__ = ["InFlight"]


class InFlight:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.running = 0
        self._claims: dict[int, ClaimedRow] = {}

    @property
    def free_slots(self) -> int:
        return self.concurrency - self.running

    def claimed(self, row: ClaimedRow) -> None:
        self._claims[row.id] = row

    def started(self) -> None:
        self.running += 1

    def handler_done(self) -> None:
        self.running -= 1

    def settled(self, chunk_id: int) -> None:
        """The outcome is committed (or fenced out, or released): stop renewing the lease."""
        self._claims.pop(chunk_id, None)

    def held(self) -> list[int]:
        return list(self._claims)

    def held_rows(self) -> list[ClaimedRow]:
        return list(self._claims.values())
