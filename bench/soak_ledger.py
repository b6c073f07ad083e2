"""The soak's bookkeeping (bench/soak.py): every enqueued chunk by its sequence number, and
claim latencies in log-scale histograms that can be pooled over any span of windows.

The producer numbers chunks 0, 1, 2, ... in their payload (``{"i": n}``). Each sample reads,
in one REPEATABLE READ snapshot, every chunk from a low-water chunk id upwards with its first
claim's latency and its count of completed attempts, and the next low water: the lowest id
still pending or processing (or one past the newest chunk). Chunk ids grow in commit order
(one producer connection, one call at a time), so every chunk below the low water was terminal
in that snapshot and was read with its final attempt, by this sample or an earlier one: each
chunk's enqueue, first claim and completion are seen exactly once, as long as retention keeps
a finished job longer than one sample interval.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CREATED = 1
CLAIMED = 2
COMPLETED = 4

# Latency histogram bins: 1 % wide from 0.01 ms; a percentile is read to within 1 %.
_BIN_BASE_MS = 0.01
_BIN_GROWTH = math.log(1.01)


def _bin(ms: float) -> int:
    if ms <= _BIN_BASE_MS:
        return 0
    return int(math.log(ms / _BIN_BASE_MS) / _BIN_GROWTH) + 1


def _bin_upper_ms(index: int) -> float:
    return _BIN_BASE_MS * math.exp(_BIN_GROWTH * index)


@dataclass
class Histogram:
    """Latencies in milliseconds, binned 1 % wide; ``quantile`` answers with a bin's upper edge."""

    bins: Counter[int] = field(default_factory=Counter)

    def add(self, ms: float) -> None:
        self.bins[_bin(ms)] += 1

    @property
    def count(self) -> int:
        return sum(self.bins.values())

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) in ms, or None when empty."""
        total = self.count
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen >= rank:
                return round(_bin_upper_ms(index), 3)
        raise AssertionError("unreachable: rank <= total")

    @classmethod
    def pooled(cls, parts: Iterable[Histogram]) -> Histogram:
        pooled = cls()
        for part in parts:
            pooled.bins.update(part.bins)
        return pooled


@dataclass
class Window:
    """What one sample saw for the first time: chunks enqueued, first claims, completions."""

    created: int = 0
    completed: int = 0
    latency: Histogram = field(default_factory=Histogram)


class Ledger:
    """Per chunk sequence number: seen enqueued, first-claimed, completed (bit flags)."""

    def __init__(self, expected: int) -> None:
        self.flags = bytearray(max(expected, 1))
        self.low_water = 0  # chunk id
        self.duplicates: list[int] = []  # sequence numbers with two completed attempts
        self.foreign = 0  # chunks without a sequence number in range (not the soak's)

    def _grow(self, seq: int) -> None:
        if seq >= len(self.flags):
            self.flags.extend(bytes(max(seq + 1 - len(self.flags), len(self.flags) // 2)))

    def apply(
        self,
        seqs: Sequence[int | None],
        waits_ms: Sequence[float | None],
        done: Sequence[int],
        next_low_water: int,
    ) -> Window:
        """One scan: ``seqs[k]`` a chunk's number, ``waits_ms[k]`` its first claim's
        enqueue-to-claim time (None: not claimed yet), ``done[k]`` its completed attempts."""
        window = Window()
        flags = self.flags
        for seq, wait_ms, completed in zip(seqs, waits_ms, done, strict=True):
            if seq is None or seq < 0:
                self.foreign += 1
                continue
            self._grow(seq)
            flags = self.flags
            state = flags[seq]
            if not state & CREATED:
                state |= CREATED
                window.created += 1
            if wait_ms is not None and not state & CLAIMED:
                state |= CLAIMED
                window.latency.add(wait_ms)
            if completed and not state & COMPLETED:
                state |= COMPLETED
                window.completed += 1
            if completed > 1:
                self.duplicates.append(seq)
            flags[seq] = state
        self.low_water = max(self.low_water, next_low_water)
        return window

    def missing(self, enqueued: int, flag: int) -> list[int]:
        """Sequence numbers below ``enqueued`` without ``flag`` (at most the first 20)."""
        flags = self.flags[:enqueued].ljust(enqueued, b"\0")
        table = bytes(0 if value & flag else 1 for value in range(256))
        marked = flags.translate(table)
        out: list[int] = []
        at = marked.find(1)
        while at >= 0 and len(out) < 20:
            out.append(at)
            at = marked.find(1, at + 1)
        return out

    def count(self, enqueued: int, flag: int) -> int:
        """How many sequence numbers below ``enqueued`` carry ``flag``."""
        table = bytes(1 if value & flag else 0 for value in range(256))
        return self.flags[:enqueued].translate(table).count(1)

    def beyond(self, enqueued: int) -> int:
        """Chunks seen with a number the producer never handed out."""
        tail = self.flags[enqueued:]
        return len(tail) - tail.count(0)
