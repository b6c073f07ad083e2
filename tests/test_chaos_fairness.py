"""The chaos soak's fairness check (``bench/chaos_fairness.py``) on claim orders written out by
hand: it passes fair turns and fails a claim order that starves a job (a stream of new jobs
served ahead of a long one, as before fair turns), also with other daemons' slack; a job under
a limit does not wait while its slot is taken; chunks coming back are not counted.

The soak runs the same check on the claims of a real fleet (tests/test_chaos_soak.py); these
inputs are synthetic so that a starving order, which chunkd no longer produces, can be fed to it.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from chaos_fairness import Claim, Job, Life, waits, worst

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ONE_DAEMON = [Life(pid=1, started_at=T0 - timedelta(seconds=1), ended_at=None, batch=48)]


def ms(n: float) -> datetime:
    return T0 + timedelta(milliseconds=n)


def job(
    id: int,
    chunks: int,
    created: float = 0,
    *,
    finished: float | None = None,
    max_concurrency: int | None = None,
    key: str | None = None,
) -> Job:
    return Job(
        id=id,
        label=f"job {id}",
        created_at=ms(created),
        finished_at=None if finished is None else ms(finished),
        chunks={id * 1000 + seq: ms(created) for seq in range(chunks)},
        max_concurrency=max_concurrency,
        key=key,
    )


class Claims:
    """Claims one after another, each its own statement unless given a time."""

    def __init__(self, daemon: int = 1) -> None:
        self.rows: list[Claim] = []
        self._seq: dict[int, count[int]] = {}
        self._daemon = daemon

    def take(self, job_id: int, at: float, *, ended: float | None = None, n: int = 1) -> None:
        seq = next(self._seq.setdefault(job_id, count())) if n == 1 else 0
        self.rows.append(
            Claim(
                job=job_id, chunk=job_id * 1000 + seq, n=n, at=ms(at), daemon=self._daemon,
                ended_at=ms(ended if ended is not None else at + 0.5),
                outcome="completed",
            )
        )  # fmt: skip


def test_round_robin_of_three_jobs_is_within_the_bound() -> None:
    jobs = {i: job(i, 10) for i in (1, 2, 3)}
    claims = Claims()
    t = count(1)
    for _ in range(10):
        for i in (1, 2, 3):
            claims.take(i, next(t))
    found = waits(claims.rows, jobs, ONE_DAEMON)
    assert found and all(w.ok for w in found)
    assert {w.others for w in found} == {2}  # the two other jobs, once each
    assert {w.bound for w in found} == {4}  # 2 x (3 - 1), one daemon: no slack


def _starving_order() -> tuple[dict[int, Job], Claims]:
    """A long job claimed once, then 40 new jobs of 5 chunks served to their end ahead of it
    (what a stream of small jobs did to a long one before fair turns)."""
    jobs = {1: job(1, 100)}
    claims = Claims()
    claims.take(1, 1)
    t = count(2)
    for i in range(2, 42):
        created = next(t)
        jobs[i] = job(i, 5, created=created - 0.5)
        for _ in range(5):
            claims.take(i, next(t))
        jobs[i] = job(i, 5, created=created - 0.5, finished=next(t))
    claims.take(1, next(t))
    return jobs, claims


def test_a_starved_job_fails_the_check() -> None:
    jobs, claims = _starving_order()
    found = waits(claims.rows, jobs, ONE_DAEMON)
    starved = worst(found)
    assert starved is not None and not starved.ok
    assert starved.label == "job 1"
    assert (starved.others, starved.jobs, starved.slack) == (200, 41, 0)
    assert [w for w in found if not w.ok] == [starved]  # the new jobs' own waits are fine


def test_a_starved_job_fails_it_with_two_more_daemons_too() -> None:
    """Other daemons' claims in flight add their batches (S), not enough to hide starvation."""
    jobs, claims = _starving_order()
    lives = [Life(pid, T0 - timedelta(seconds=1), None, 48) for pid in (1, 2, 3)]
    starved = worst(waits(claims.rows, jobs, lives))
    assert starved is not None and starved.label == "job 1" and not starved.ok
    assert (starved.others, starved.slack, starved.bound) == (200, 96, 176)
    # A daemon that ended before the wait began, or started after it ended, adds nothing.
    lives = [*ONE_DAEMON, Life(2, ms(-5), ms(0.5), 48), Life(3, ms(500), None, 48)]
    starved = worst(waits(claims.rows, jobs, lives))
    assert starved is not None and starved.slack == 0


def test_chunks_coming_back_are_not_counted() -> None:
    jobs = {1: job(1, 3), 2: job(2, 1)}
    claims = Claims()
    claims.take(1, 1)
    for at in range(2, 20):  # job 2's one chunk, claimed again and again (retries, reaps)
        claims.take(2, at, n=1 if at == 2 else at - 1)
    claims.take(1, 20)
    (wait,) = [w for w in waits(claims.rows, jobs, ONE_DAEMON) if w.job == 1]
    assert wait.others == 1 and wait.ok


def test_a_job_under_a_limit_does_not_wait_while_its_slot_is_taken() -> None:
    """A max_concurrency = 1 job's wait counts only the claims made once its chunk ended."""
    jobs = {1: job(1, 5, max_concurrency=1), 2: job(2, 50)}
    claims = Claims()
    claims.take(1, 1, ended=10)
    for at in range(2, 10):  # its slot is taken: not a wait
        claims.take(2, at)
    claims.take(2, 11)
    claims.take(2, 12)
    claims.take(1, 13)
    (wait,) = [w for w in waits(claims.rows, jobs, ONE_DAEMON) if w.job == 1]
    assert wait.others == 2 and wait.ok
    # Its slack counts every daemon alive: the claim in flight where its slot freed too.
    assert wait.slack == 48
    # Had its slot been free, the same claims would have been a wait beyond the bound.
    early = Claims()
    early.take(1, 1, ended=1.5)
    for at in [*range(2, 10), 11, 12]:
        early.take(2, at)
    early.take(1, 13)
    (wait,) = [w for w in waits(early.rows, jobs, []) if w.job == 1]
    assert wait.others == 10 and not wait.ok


def test_a_keys_jobs_wait_only_while_the_key_has_room() -> None:
    jobs = {1: job(1, 5, key="k"), 2: job(2, 5, key="k"), 3: job(3, 50)}
    claims = Claims()
    claims.take(1, 1, ended=20)
    claims.take(2, 2, ended=3)  # the key (limit 2) full from 2 to 3, and from 4 on
    claims.take(3, 2.5)  # full: not counted
    claims.take(3, 3.5)  # room: counted
    claims.take(2, 4, ended=30)
    for at in range(5, 20):  # full: not counted
        claims.take(3, at)
    claims.take(1, 21)
    (wait,) = [w for w in waits(claims.rows, jobs, [], {"k": 2}) if w.job == 1]
    assert wait.others == 3  # job 2 twice and job 3 once, while the key had room
    assert wait.ok


def test_a_claims_place_in_its_statement_comes_from_its_turn() -> None:
    """One statement takes chunks by turn: the other job's chunks before the waiting job's
    chunk in the statement that ended the wait are counted, those after are not."""
    jobs = {1: job(1, 10), 2: job(2, 10)}
    rows = [
        Claim(job=1, chunk=1000, n=1, at=ms(1), daemon=1, turn=0),
        Claim(job=2, chunk=2000, n=1, at=ms(2), daemon=1, turn=1),
        Claim(job=2, chunk=2001, n=1, at=ms(2), daemon=1, turn=2),
        Claim(job=1, chunk=1001, n=1, at=ms(2), daemon=1, turn=3),
        Claim(job=2, chunk=2002, n=1, at=ms(2), daemon=1, turn=4),
    ]
    (wait,) = [w for w in waits(rows, jobs, ONE_DAEMON) if w.job == 1]
    assert wait.others == 2 and wait.ok
    # Without turns the place is unknown, and the whole statement is counted against it.
    unknown = [Claim(c.job, c.chunk, c.n, c.at, c.daemon) for c in rows]
    (wait,) = [w for w in waits(unknown, jobs, ONE_DAEMON) if w.job == 1]
    assert wait.others == 3 and not wait.ok
