"""chunkd.testing: drain, the enqueue assertions, make_chunk against a chunk the daemon's own
claim built, and the failure simulators' edge cases (the common cases run in
examples/app-quickstart, tests/test_examples.py)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest

import chunkd
import chunkd.testing
from chunkd import Chunk, Continue, RetryLater
from chunkd.testing import ChunkFailedError, DrainLimitError, SimulationError

app = chunkd.App()
seen: list[Chunk] = []


@app.handler("flaky")
async def flaky(chunk: Chunk) -> dict[str, int]:
    seen.append(chunk)
    if chunk.attempt == 1:
        raise RuntimeError("flaky")  # retried after its backoff: drain fast-forwards it
    return {"attempt": chunk.attempt}


@app.handler("polite")
async def polite(chunk: Chunk) -> dict[str, int]:
    """Asked to come back in an hour the first time (a snooze: no attempt spent)."""
    if not any(c.chunk_id == chunk.chunk_id for c in seen):
        seen.append(chunk)
        raise RetryLater(3600)
    return {"attempt": chunk.attempt}


@app.handler("broken")
async def broken(chunk: Chunk) -> None:
    raise KeyError("page")


@app.handler("forever")
async def forever(chunk: Chunk) -> Continue:
    return Continue(result=None, chunks=[{"n": chunk.payload["n"] + 1}])


@app.handler("capture")
async def capture(chunk: Chunk) -> None:
    seen.append(chunk)


@app.handler("stubborn")
async def stubborn(chunk: Chunk) -> dict[str, bool]:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass  # goes on after its cancellation: what it reports is refused
    return {"done": True}


@app.handler("quick")
async def quick(chunk: Chunk) -> None:
    return None


async def _create(conn: asyncpg.Connection, kind: str, chunks: str, **kwargs: Any) -> Any:
    named = "".join(f", {k} => ${i + 3}" for i, k in enumerate(kwargs))
    return await conn.fetchval(
        f"SELECT chunkd.create_sync_job($1, $2::jsonb{named})", kind, chunks, *kwargs.values()
    )


async def _statuses(conn: asyncpg.Connection, job: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT status FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1 "
        "ORDER BY seq",
        job,
    )
    return [r["status"] for r in rows]


# --- drain ----------------------------------------------------------------------------------


async def test_drain_runs_retries_and_delayed_jobs_at_once(conn, database) -> None:  # type: ignore[no-untyped-def]
    job = await _create(conn, "flaky", "[{}, {}]")
    later = await conn.fetchval(
        "SELECT chunkd.create_sync_job('quick', '[{}]', run_at => now() + interval '1 day')"
    )
    left = await chunkd.testing.drain(app, database.dsn, kinds=["flaky"], fast_forward=False)
    assert left == {"completed": 0, "snoozed": 0, "retried": 2, "failed": 0, "fenced": 0}
    assert await _statuses(conn, job) == ["pending", "pending"]  # waiting for the backoff

    counts = await chunkd.testing.drain(app, database.dsn, kinds=["flaky", "quick"])

    assert counts == {"completed": 3, "snoozed": 0, "retried": 0, "failed": 0, "fenced": 0}
    assert await chunkd.testing.results(conn, job) == [{"attempt": 2}, {"attempt": 2}]
    assert await _statuses(conn, later) == ["completed"]


async def test_drain_fast_forwards_a_snooze_without_spending_an_attempt(conn, database) -> None:  # type: ignore[no-untyped-def]
    job = await _create(conn, "polite", "[{}, {}]")
    counts = await chunkd.testing.drain(app, database.dsn, kinds=["polite"])
    assert counts == {"completed": 2, "snoozed": 2, "retried": 0, "failed": 0, "fenced": 0}
    assert await chunkd.testing.results(conn, job) == [{"attempt": 1}, {"attempt": 1}]


async def test_drain_raises_the_handlers_error_with_its_traceback(conn, database) -> None:  # type: ignore[no-untyped-def]
    job = await _create(conn, "broken", "[{}]")
    with pytest.raises(ChunkFailedError) as caught:
        await chunkd.testing.drain(app, database.dsn, raise_errors=True)
    assert str(caught.value) == (
        f"chunk 0 of job {job} (broken, attempt 1) retried: KeyError: 'page'"
    )
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.__cause__.__traceback__ is not None
    # Without raise_errors the same chunk runs its attempts out and fails for good.
    counts = await chunkd.testing.drain(app, database.dsn)
    assert counts == {"completed": 0, "snoozed": 0, "retried": 1, "failed": 1, "fenced": 0}


async def test_drain_stops_a_job_that_never_ends(conn, database) -> None:  # type: ignore[no-untyped-def]
    await _create(conn, "forever", '[{"n": 0}]')
    with pytest.raises(DrainLimitError, match="drain ran 5 chunks and more are runnable"):
        await chunkd.testing.drain(app, database.dsn, max_chunks=5)


async def test_drain_refuses_a_kind_the_app_does_not_handle(database) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LookupError, match="no handler for kind 'nope'"):
        await chunkd.testing.drain(app, database.dsn, kinds=["nope"])


# --- make_chunk -----------------------------------------------------------------------------

PAYLOAD = {"b": Decimal("1.50"), "a": [1e3, 0.1, -0.0, 10**20], "long key": {"zz": 1, "y": 1e-7},
           "s": "é"}  # fmt: skip


async def test_make_chunk_is_the_chunk_the_daemon_builds(conn, database) -> None:  # type: ignore[no-untyped-def]
    seen.clear()
    await chunkd.create_sync_job(conn, "capture", [PAYLOAD], payload={"x": 2.5})
    await chunkd.testing.drain(app, database.dsn)
    [claimed] = seen
    made = chunkd.testing.make_chunk(
        PAYLOAD, {"x": 2.5}, kind="capture", chunk_id=claimed.chunk_id,
        queue_id=claimed.queue_id, sync_job_id=claimed.sync_job_id,
    )  # fmt: skip
    assert made.to_json() == claimed.to_json()  # the JSON http: and exec: handlers get
    assert repr(made) == repr(claimed)  # the values, their types and the keys' order
    assert made.payload["a"][:2] == [Decimal("1000.0"), Decimal("0.1")]  # never a float
    assert made.job_payload == {"x": Decimal("2.5")}
    assert made.idempotency_key == f"chunkd:{claimed.chunk_id}"


# --- what was enqueued ----------------------------------------------------------------------


async def test_assert_and_refute_enqueued_match_parts_of_payloads(conn, database) -> None:  # type: ignore[no-untyped-def]
    await _create(conn, "quick", '[{"page": 1, "tags": ["a", "b"]}]', payload='{"box": "ada"}')
    await _create(conn, "quick", '[{"page": 2}]', payload='{"box": "bob"}')

    jobs = await chunkd.testing.assert_enqueued(conn, kind="quick", payload={"box": "ada"})
    assert [j.chunks for j in jobs] == [[{"page": 1, "tags": ["a", "b"]}]]
    await chunkd.testing.assert_enqueued(conn, chunk={"tags": ["b"]}, count=1)
    await chunkd.testing.assert_enqueued(database.dsn, kind="quick", count=2)
    await chunkd.testing.refute_enqueued(conn, kind="quick", chunk={"page": 3})
    async with await psycopg.AsyncConnection.connect(database.dsn) as psy:
        await chunkd.testing.assert_enqueued(psy, payload={"box": "bob"})

    with pytest.raises(AssertionError) as caught:
        await chunkd.testing.assert_enqueued(conn, kind="quick", payload={"box": "eve"})
    assert str(caught.value) == (
        'expected a job with kind=\'quick\', payload containing {"box":"eve"} enqueued: none '
        "found; enqueued: 2 job(s):\n"
        "  quick payload={'box': 'ada'} chunks=[{'page': 1, 'tags': ['a', 'b']}]\n"
        "  quick payload={'box': 'bob'} chunks=[{'page': 2}]"
    )
    with pytest.raises(AssertionError, match=r"^expected no job with kind='quick': 2 job\(s\)"):
        await chunkd.testing.refute_enqueued(conn, kind="quick")
    with pytest.raises(AssertionError, match="3 time"):
        await chunkd.testing.assert_enqueued(conn, kind="quick", count=3)


# --- the failure simulators -----------------------------------------------------------------


async def test_a_redelivery_needs_an_attempt_left(conn, database) -> None:  # type: ignore[no-untyped-def]
    job = await _create(conn, "quick", "[{}]", max_attempts=1)
    twice = await chunkd.testing.run_twice(app, database.dsn)
    assert (twice.first.outcome, twice.second) == ("lost", None)
    row = await conn.fetchrow(
        "SELECT status, error_message FROM chunkd.chunk_processing_queue "
        "WHERE parent_sync_job_id = $1",
        job,
    )
    assert tuple(row) == ("failed", "lease expired")


async def test_a_simulator_with_nothing_to_run_says_so(database) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SimulationError, match="no runnable chunk of kind 'quick': enqueue"):
        await chunkd.testing.run_twice(app, database.dsn, kind="quick")


async def test_a_lost_lease_after_the_handler_returned_is_refused(conn, database) -> None:  # type: ignore[no-untyped-def]
    await _create(conn, "quick", "[{}]")
    with pytest.raises(SimulationError, match="the handler returned before the fault struck"):
        await chunkd.testing.lose_lease(app, database.dsn, at=asyncio.Event())


async def test_a_handler_that_swallows_its_cancellation_is_fenced(conn, database) -> None:  # type: ignore[no-untyped-def]
    job = await _create(conn, "stubborn", "[{}]")
    lost = await chunkd.testing.lose_lease(app, database.dsn, at=0.05, chunk_timeout_s=1)
    # The redelivery hangs in the same way, until the chunk timeout (1 s) cancels it: a
    # handler that returns after a timeout keeps its result.
    assert [run.outcome for run in lost.runs] == ["fenced", "completed"]
    assert await chunkd.testing.results(conn, job) == [{"done": True}]


async def test_a_child_process_needs_an_app_it_can_import(conn, database) -> None:  # type: ignore[no-untyped-def]
    local = chunkd.App()
    local.handler("quick")(quick)
    await _create(conn, "quick", "[{}]")
    with pytest.raises(SimulationError, match="pass app_spec='module:attribute'"):
        await chunkd.testing.kill_mid_chunk(local, database.dsn, at=0.1)
    with pytest.raises(SimulationError, match=r"could not start the handler: .*has no app 'x'"):
        await chunkd.testing.kill_mid_chunk(local, database.dsn, at=0.1, app_spec="chunkd:x")
