"""The mixed workload of the chaos soak (``bench/chaos.py``) and its checks.

Beside the soak's 20 jobs (5 of them ``max_concurrency = 1``), its continuation chain and its
schedule: two long jobs (a fifth of ``--chunks`` each) enqueued at the start, a stream of small
jobs (1 to 12 chunks, one every 0.5 s) arriving throughout the chaos, and two jobs under one
concurrency key limited to 3 (``set_concurrency_limit``). Every job the soak enqueues has its
first turn read in the transaction that enqueues it, so the place of each of its first claims
within a claim statement is known (``chaos_fairness``).

Checked from ``chunkd.attempts`` once the run converged: a ``max_concurrency = 1`` job never had
two claims in flight and was claimed in ``seq`` order (a chunk claimed again, for a retry or
after a reap, before the next one); the key never had more claims in flight than its limit; and
no job waited longer than the fairness bound (``chaos_fairness``).
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

import asyncpg
from chaos_fairness import Claim, Job, Life, Wait, waits, worst

__all__ = ["KEY", "KEY_LIMIT", "Mix", "mixed_checks", "most_at_once"]

KEY = "chaos-key"
KEY_LIMIT = 3
KEY_JOBS = 2
LONG_JOBS = 2
STREAM_EVERY_S = 0.5
STREAM_SIZES = (1, 12)
T = TypeVar("T")
Result = tuple[str, str, bool | None]  # a check's name, value, and whether it holds


class Runs(Protocol):
    """The soak's control connection (``chaos.Db``)."""

    async def run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T: ...


@dataclass
class Mix:
    """The jobs the soak enqueues: their labels and first turns, and the stream's progress."""

    kind: str
    max_attempts: int
    rng: random.Random
    labels: dict[UUID, str] = field(default_factory=dict)
    first_turns: dict[UUID, int] = field(default_factory=dict)
    streamed: list[int] = field(default_factory=list)  # chunks of each stream job
    long_sizes: list[int] = field(default_factory=list)
    key_sizes: list[int] = field(default_factory=list)

    async def enqueue(
        self,
        db: Runs,
        chunks: list[Any],
        label: str,
        *,
        max_concurrency: int | None = None,
        key: str | None = None,
    ) -> UUID:
        """Enqueues one job and reads its first turn in the same transaction (no claim can
        have taken a chunk yet: they are not committed)."""

        async def call(c: asyncpg.Connection) -> tuple[UUID, int]:
            async with c.transaction():
                job = await c.fetchval(
                    "SELECT chunkd.create_sync_job($1, $2::jsonb, $3::jsonb,"
                    " max_concurrency => $4, max_attempts => $5, concurrency_key => $6)",
                    self.kind, json.dumps(chunks), json.dumps({"label": label}),
                    max_concurrency, self.max_attempts, key,
                )  # fmt: skip
                turn = await c.fetchval(
                    "SELECT min(r.turn - r.seq) FROM chunkd.ready r"
                    " JOIN chunkd.jobs j ON j.id = r.job_id WHERE j.public_id = $1",
                    job,
                )
            return job, turn

        job, turn = await db.run(call)
        self.labels[job] = label
        self.first_turns[job] = turn
        return job

    async def start(self, db: Runs, total_chunks: int, key_job_size: int) -> None:
        """The long jobs and the key's jobs, at the start of the chaos."""
        await db.run(
            lambda c: c.execute("SELECT chunkd.set_concurrency_limit($1, $2)", KEY, KEY_LIMIT)
        )
        size = max(1000, total_chunks // 5)
        for i in range(LONG_JOBS):
            await self.enqueue(db, [{"long": i, "i": n} for n in range(size)], f"long job {i}")
            self.long_sizes.append(size)
        for i in range(KEY_JOBS):
            chunks = [{"key": i, "i": n} for n in range(key_job_size)]
            await self.enqueue(db, chunks, f"key job {i}", key=KEY)
            self.key_sizes.append(key_job_size)

    async def stream(self, db: Runs, elapsed_s: float, until_s: float) -> None:
        """The small jobs due by ``elapsed_s``: one every STREAM_EVERY_S up to ``until_s``."""
        while (len(self.streamed) + 1) * STREAM_EVERY_S <= min(elapsed_s, until_s):
            n = self.rng.randint(*STREAM_SIZES)
            no = len(self.streamed)
            await self.enqueue(db, [{"stream": no, "i": i} for i in range(n)], f"new job {no}")
            self.streamed.append(n)

    def describe(self) -> str:
        return (
            f"{len(self.long_sizes)} long jobs of {self.long_sizes[0] if self.long_sizes else 0},"
            f" {len(self.streamed)} new jobs of {STREAM_SIZES[0]}-{STREAM_SIZES[1]} chunks"
            f" ({sum(self.streamed)}) every {STREAM_EVERY_S:g} s, {len(self.key_sizes)} jobs of"
            f" {self.key_sizes[0] if self.key_sizes else 0} under key '{KEY}' (limit {KEY_LIMIT})"
        )


def most_at_once(spans: Sequence[tuple[datetime, datetime]]) -> int:
    """The most of these [start, end) intervals open at one moment (an end before a start at
    the same instant)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _pid(worker_id: str) -> int:
    parts = worker_id.split(":")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else -1


async def mixed_checks(db: Runs, mix: Mix, lives: list[Life]) -> list[Result]:
    attempts = await db.run(
        lambda c: c.fetch(
            "SELECT a.chunk_id, a.n, a.job_id, a.worker_id, a.claimed_at, a.ended_at, a.outcome,"
            " c.seq FROM chunkd.attempts a JOIN chunkd.chunks c ON c.id = a.chunk_id"
        )
    )
    job_rows = await db.run(
        lambda c: c.fetch(
            "SELECT id, public_id, kind, priority, created_at, finished_at, max_concurrency,"
            " concurrency_key FROM chunkd.jobs"
        )
    )
    chunk_rows = await db.run(lambda c: c.fetch("SELECT id, job_id, created_at FROM chunkd.chunks"))
    limits = await db.run(
        lambda c: c.fetch("SELECT key, max_concurrency FROM chunkd.concurrency_limits")
    )
    key_limits = {r["key"]: r["max_concurrency"] for r in limits}
    results = _ordered_job_checks(attempts, job_rows)
    results += _key_checks(attempts, job_rows, key_limits)
    results += _fairness(attempts, job_rows, chunk_rows, key_limits, mix, lives)
    return results


def _ordered_job_checks(
    attempts: Sequence[asyncpg.Record], job_rows: Sequence[asyncpg.Record]
) -> list[Result]:
    ordered = {r["id"] for r in job_rows if r["max_concurrency"] == 1}
    by_job: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for a in attempts:
        if a["job_id"] in ordered:
            by_job[a["job_id"]].append(a)
    two_in_flight = back_in_seq = claims = 0
    for rows in by_job.values():
        rows.sort(key=lambda a: (a["claimed_at"], a["n"]))
        claims += len(rows)
        for before, a in itertools.pairwise(rows):
            if before["ended_at"] is None or a["claimed_at"] < before["ended_at"]:
                two_in_flight += 1
            if a["seq"] < before["seq"]:
                back_in_seq += 1
    return [
        (
            "max_concurrency = 1 jobs: claims while another of the job was in flight",
            f"{two_in_flight} ({len(ordered)} jobs, {claims} claims)",
            two_in_flight == 0 and claims > 0,
        ),
        (
            "  claims of a lower seq than the claim before (out of seq order)",
            str(back_in_seq),
            back_in_seq == 0,
        ),
    ]


def _key_checks(
    attempts: Sequence[asyncpg.Record],
    job_rows: Sequence[asyncpg.Record],
    key_limits: dict[str, int],
) -> list[Result]:
    keyed = {r["id"] for r in job_rows if r["concurrency_key"] == KEY}
    spans = [
        (a["claimed_at"], a["ended_at"] or datetime.max.replace(tzinfo=a["claimed_at"].tzinfo))
        for a in attempts
        if a["job_id"] in keyed
    ]
    most = most_at_once(spans)
    limit = key_limits.get(KEY, KEY_LIMIT)
    return [
        (
            f"concurrency key '{KEY}' (limit {limit}): most claims in flight at once",
            f"{most} ({len(keyed)} jobs, {len(spans)} claims)",
            0 < most <= limit,
        )
    ]


def _label(row: asyncpg.Record, mix: Mix) -> str:
    label = mix.labels.get(row["public_id"])
    if label is not None:
        return label
    return f"{row['kind']} job {row['id']}"


def _fairness(
    attempts: Sequence[asyncpg.Record],
    job_rows: Sequence[asyncpg.Record],
    chunk_rows: Sequence[asyncpg.Record],
    key_limits: dict[str, int],
    mix: Mix,
    lives: list[Life],
) -> list[Result]:
    chunks: dict[int, dict[int, datetime]] = defaultdict(dict)
    for r in chunk_rows:
        chunks[r["job_id"]][r["id"]] = r["created_at"]
    jobs = {
        r["id"]: Job(
            id=r["id"],
            label=_label(r, mix),
            created_at=r["created_at"],
            finished_at=r["finished_at"],
            chunks=chunks[r["id"]],
            priority=r["priority"],
            max_concurrency=r["max_concurrency"],
            key=r["concurrency_key"],
        )
        for r in job_rows
    }
    first_turn = {r["id"]: mix.first_turns.get(r["public_id"]) for r in job_rows}
    claims = []
    for a in attempts:
        base = first_turn.get(a["job_id"])
        claims.append(
            Claim(
                job=a["job_id"],
                chunk=a["chunk_id"],
                n=a["n"],
                at=a["claimed_at"],
                daemon=_pid(a["worker_id"]),
                ended_at=a["ended_at"],
                outcome=a["outcome"],
                # A first claim's turn: its job's first turn plus its seq.
                turn=base + a["seq"] if base is not None and a["n"] == 1 else None,
            )
        )
    found = waits(claims, jobs, lives, key_limits)
    beyond = [w for w in found if not w.ok]
    kinds: Counter[str] = Counter(_group(w) for w in found)
    measured = ", ".join(f"{n} {group}" for group, n in sorted(kinds.items()))
    results: list[Result] = [
        (
            "fair turns: waits longer than 2 x (J - 1) + S first claims of other jobs",
            f"{len(beyond)} of {len(found)} ({measured})",
            not beyond and kinds["of long jobs"] > 0 and kinds["of new jobs"] > 0,
        )
    ]
    top = worst(found)
    if top is not None:
        results.append(("  the wait closest to its bound", _said(top), None))
    for group in sorted(kinds):
        longest = max((w for w in found if _group(w) == group), key=lambda w: w.others)
        results.append((f"  the longest wait {group}", _said(longest), None))
    results += [("  e.g.", _said(w), None) for w in beyond[:5]]
    return results


def _group(w: Wait) -> str:
    if w.label.startswith("long job"):
        return "of long jobs"
    if w.label.startswith("new job"):
        return "of new jobs"
    return "under a limit" if w.limited else "of other jobs"


def _said(w: Wait) -> str:
    return (
        f"{w.label} waited {w.others} first claims of other jobs over"
        f" {(w.end - w.start).total_seconds():.3f} s; bound 2 x ({w.jobs} - 1) + {w.slack}"
        f" = {w.bound} (J = {w.jobs} jobs, S = {w.slack} for {w.daemons} live daemons)"
    )
