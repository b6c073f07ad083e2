"""The Python client (chunkd.client, async; chunkd.client.sync, blocking) on the caller's own
connection: asyncpg connections and pools, psycopg 3 async and sync connections.

Transactional enqueue is checked against an "orders" table the caller writes in the same
transaction: the job exists exactly when the order does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest

import chunkd
from chunkd.client import sync
from chunkd.db import connect
from enqueue_helpers import job_count, overall_status
from sql_helpers import claim, complete

ORDERS = "CREATE TABLE public.orders (id int PRIMARY KEY)"


class Abort(Exception):
    """Raised inside a transaction to roll it back, as an application error would."""


async def _orders(conn: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM public.orders ORDER BY id")]


async def _jobs(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch("SELECT kind, payload FROM chunkd.sync_jobs ORDER BY created_at, kind")
    return [(r["kind"], json.dumps(r["payload"])) for r in rows]


# --------------------------------------------------------------------------------------------
# Transactional enqueue, per driver
# --------------------------------------------------------------------------------------------


async def test_asyncpg_job_commits_and_rolls_back_with_the_callers_transaction(conn) -> None:
    await conn.execute(ORDERS)
    async with conn.transaction():
        await conn.execute("INSERT INTO public.orders VALUES (1)")
        job = await chunkd.create_sync_job(conn, "ship", [{"order": 1}], payload={"order": 1})
        [bulk] = await chunkd.create_sync_jobs(conn, [{"kind": "invoice", "chunks": [1]}])
    with pytest.raises(Abort):
        async with conn.transaction():
            await conn.execute("INSERT INTO public.orders VALUES (2)")
            await chunkd.create_sync_job(conn, "ship", [{"order": 2}], payload={"order": 2})
            await chunkd.create_sync_jobs(conn, [{"kind": "invoice", "chunks": [2]}])
            raise Abort
    assert await _orders(conn) == [1]
    assert sorted(await _jobs(conn)) == [("invoice", "{}"), ("ship", '{"order": 1}')]
    assert (await chunkd.get_progress(conn, job)).total_chunks == 1
    assert await overall_status(conn, bulk) == "pending"


async def test_asyncpg_pool_enqueues_on_a_connection_of_its_own(pool, conn) -> None:
    job = await chunkd.create_sync_job(pool, "k", [1, 2], dedupe_key="p")
    assert await chunkd.create_sync_job(pool, "k", [3], dedupe_key="p") == job
    async with pool.acquire() as held:  # a PoolConnectionProxy works too
        assert (await chunkd.get_progress(held, job)).pending_chunks == 2
    assert await chunkd.cancel(pool, job) == 2
    assert await job_count(conn) == 1


@pytest.fixture
async def psycopg_async(database) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A psycopg AsyncConnection as an application opens it: not in autocommit mode."""
    connection = await psycopg.AsyncConnection.connect(database.dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def test_psycopg_async_job_commits_and_rolls_back_with_the_callers_transaction(
    conn, psycopg_async
) -> None:
    await conn.execute(ORDERS)
    # Non-autocommit: the first statement opens the transaction, as psycopg always does.
    await psycopg_async.execute("INSERT INTO public.orders VALUES (1)")
    await chunkd.create_sync_job(psycopg_async, "ship", [1], payload={"order": 1})
    assert await job_count(conn) == 0, "not visible before the caller commits"
    await psycopg_async.commit()
    await psycopg_async.execute("INSERT INTO public.orders VALUES (2)")
    await chunkd.create_sync_jobs(psycopg_async, [{"kind": "ship", "chunks": [2]}])
    await psycopg_async.rollback()
    with pytest.raises(Abort):
        async with psycopg_async.transaction():
            await psycopg_async.execute("INSERT INTO public.orders VALUES (3)")
            await chunkd.create_sync_job(psycopg_async, "ship", [3], payload={"order": 3})
            raise Abort
    async with psycopg_async.transaction():
        await psycopg_async.execute("INSERT INTO public.orders VALUES (4)")
        await chunkd.create_sync_job(psycopg_async, "ship", [4], payload={"order": 4})
    assert await _orders(conn) == [1, 4]
    assert await _jobs(conn) == [("ship", '{"order": 1}'), ("ship", '{"order": 4}')]


@pytest.fixture
def psycopg_sync(database) -> Iterator[psycopg.Connection[Any]]:
    connection = psycopg.connect(database.dsn)
    try:
        yield connection
    finally:
        connection.close()


async def test_psycopg_sync_job_commits_and_rolls_back_with_the_callers_transaction(
    conn, psycopg_sync
) -> None:
    await conn.execute(ORDERS)
    psycopg_sync.execute("INSERT INTO public.orders VALUES (1)")
    job = sync.create_sync_job(psycopg_sync, "ship", [1], payload={"order": 1})
    psycopg_sync.commit()
    psycopg_sync.execute("INSERT INTO public.orders VALUES (2)")
    sync.create_sync_job(psycopg_sync, "ship", [2], payload={"order": 2})
    psycopg_sync.rollback()
    with pytest.raises(Abort), psycopg_sync.transaction():
        psycopg_sync.execute("INSERT INTO public.orders VALUES (3)")
        sync.create_sync_jobs(psycopg_sync, [{"kind": "ship", "chunks": [3]}])
        raise Abort
    with psycopg_sync.transaction():
        psycopg_sync.execute("INSERT INTO public.orders VALUES (4)")
        [bulk] = sync.create_sync_jobs(psycopg_sync, [{"kind": "ship", "chunks": [4]}])
    assert await _orders(conn) == [1, 4]
    assert await _jobs(conn) == [("ship", '{"order": 1}'), ("ship", "{}")]
    assert sync.get_progress(psycopg_sync, job).overall_status == "pending"
    assert sync.get_progress(psycopg_sync, str(bulk)).total_chunks == 1


# --------------------------------------------------------------------------------------------
# The functions, on every driver
# --------------------------------------------------------------------------------------------

DRIVERS = ["asyncpg", "asyncpg-pool", "psycopg-async", "psycopg-sync"]


class Client:
    """One driver's connection and the client functions for it, awaitable either way."""

    def __init__(self, target: Any, blocking: bool) -> None:
        self.target = target
        self.blocking = blocking

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.blocking:
            return getattr(sync, name)(self.target, *args, **kwargs)
        return await getattr(chunkd.client, name)(self.target, *args, **kwargs)


@pytest.fixture(params=DRIVERS)
async def client(request, database, conn, pool) -> AsyncIterator[Client]:
    driver = request.param
    if driver == "asyncpg":
        yield Client(conn, blocking=False)
    elif driver == "asyncpg-pool":
        yield Client(pool, blocking=False)
    elif driver == "psycopg-async":
        connection = await psycopg.AsyncConnection.connect(database.dsn, autocommit=True)
        try:
            yield Client(connection, blocking=False)
        finally:
            await connection.close()
    else:
        blocking = psycopg.connect(database.dsn, autocommit=True)
        try:
            yield Client(blocking, blocking=True)
        finally:
            blocking.close()


async def test_delayed_start_and_dedupe_key(client, conn) -> None:
    run_at = datetime.now(UTC) + timedelta(hours=1)
    job = await client.call("create_sync_job", "mail", [1, 2], run_at=run_at, dedupe_key="ada")
    assert await client.call("create_sync_job", "mail", [3], dedupe_key="ada") == job
    progress = await client.call("get_progress", job)
    assert progress.overall_status == "scheduled" and progress.run_at == run_at
    assert (progress.total_chunks, progress.pending_chunks, progress.finished) == (2, 2, False)
    assert await client.call("cancel", job) == 2
    assert (await client.call("get_progress", job)).finished
    assert await client.call("create_sync_job", "mail", [3], dedupe_key="ada") != job
    assert await job_count(conn) == 2


async def test_open_jobs_flow_control_and_follow_ups_from_the_client(client, conn) -> None:
    job = await client.call(
        "create_sync_job",
        "import",
        [],
        open=True,
        on_finish_kind="imported",
        max_per_second=2.5,
        concurrency_key="tenant-7",
    )
    row = await conn.fetchrow(
        "SELECT max_per_second, concurrency_key FROM chunkd.sync_jobs WHERE id = $1", job
    )
    assert (row["max_per_second"], row["concurrency_key"]) == (Decimal("2.5"), "tenant-7")
    progress = await client.call("get_progress", job)
    assert (progress.open, progress.total_is_final, progress.on_finish_kind) == (
        True,
        False,
        "imported",
    )
    with pytest.raises(chunkd.InvalidInputError, match="max_per_second"):
        await client.call("create_sync_job", "import", [1], max_per_second="fast")


async def test_wait_returns_the_final_progress_or_times_out(client, database) -> None:
    job = await client.call("create_sync_job", "mail", [1])
    with pytest.raises(TimeoutError, match="still pending"):
        await client.call("wait", job, 0.2, poll_s=0.05)

    async def finish_soon() -> None:
        # A worker of its own: the asyncpg client waits on the test's connection meanwhile.
        worker = await connect(database.dsn)
        try:
            await asyncio.sleep(0.3)
            (row,) = await claim(worker, "w", 1, kinds=["mail"])
            assert await complete(worker, row["queue_id"], "w", row["attempt"])
        finally:
            await worker.close()

    finisher = asyncio.create_task(finish_soon())
    if client.blocking:  # the blocking wait must not hold the loop the finisher runs on
        progress = await asyncio.to_thread(sync.wait, client.target, job, 30, poll_s=0.05)
    else:
        progress = await client.call("wait", job, 30, poll_s=0.05)
    await finisher
    assert (progress.overall_status, progress.completed_chunks) == ("completed", 1)


async def test_bulk_ids_in_input_order(client, conn) -> None:
    later = datetime.now(UTC) + timedelta(minutes=5)
    ids = await client.call(
        "create_sync_jobs",
        [
            {"kind": "a", "chunks": [1]},
            {"kind": "b", "chunks": [1, 2], "run_at": later, "dedupe_key": "b"},
            {"kind": "b", "chunks": [9], "dedupe_key": "b"},
        ],
    )
    assert len(ids) == 3 and ids[1] == ids[2] != ids[0]
    kinds = [(await client.call("get_progress", i)).kind for i in ids]
    assert kinds == ["a", "b", "b"]
    assert await job_count(conn) == 2


async def test_retry_failed_puts_failed_chunks_back(client, conn) -> None:
    job = await client.call("create_sync_job", "k", [1], max_attempts=1)
    (row,) = await conn.fetch("SELECT * FROM chunkd.claim_next_chunk_job_safe('w', 1)")
    await conn.fetchval("SELECT chunkd.fail_chunk_job_safe($1, 'w', 1, 'boom')", row["queue_id"])
    assert (await client.call("get_progress", job)).overall_status == "partial_failure"
    assert await client.call("retry_failed", job) == 1
    assert (await client.call("get_progress", job)).pending_chunks == 1


BAD_CALLS = [
    (("k", {"a": 1}), {}, "chunks must be a JSON array of chunk payloads, got object"),
    (("k", "text"), {}, "chunks must be a JSON array of chunk payloads, got string"),
    (("k", []), {}, "chunks must not be empty"),
    (("k", [1]), {"dedupe_key": ""}, "dedupe_key must not be empty (NULL: no key)"),
    (("", [1]), {}, "kind must be a non-empty text of at most 200 characters"),
    (("k", [1]), {"max_concurrency": 0}, "max_concurrency must be NULL (unlimited) or >= 1, got 0"),
    (("k", [1]), {"run_at": "tomorrow"}, "run_at must be a datetime with a time zone, got str"),
    (
        ("k", [1]),
        {"run_at": datetime(2026, 12, 1, 8)},
        "run_at 2026-12-01T08:00:00 has no time zone: give an aware datetime "
        "(e.g. datetime.now(UTC) + timedelta(minutes=15))",
    ),
    (("k", [float("nan")]), {}, "chunks is not JSON: Out of range float values are not JSON"),
    (("k", [1]), {"priority": 2**40}, "priority must fit in 32 bits, got 1099511627776"),
    (("k", ["\x00"]), {}, "unsupported Unicode escape sequence"),
]


async def test_bad_input_is_a_value_error_with_the_message_and_writes_nothing(client, conn) -> None:
    for args, kwargs, message in BAD_CALLS:
        with pytest.raises(chunkd.InvalidInputError) as refused:
            await client.call("create_sync_job", *args, **kwargs)
        assert isinstance(refused.value, ValueError)
        assert str(refused.value).startswith(message), (args, kwargs)
    assert await job_count(conn) == 0


async def test_a_bad_job_in_a_bulk_call_is_named_and_nothing_is_written(client, conn) -> None:
    with pytest.raises(chunkd.InvalidInputError) as refused:
        await client.call(
            "create_sync_jobs", [{"kind": "k", "chunks": [1]}, {"kind": "k", "chunks": {}}]
        )
    assert (
        str(refused.value) == "jobs[1]: chunks must be a JSON array of chunk payloads, got object"
    )
    with pytest.raises(chunkd.InvalidInputError, match=r'^jobs\[0\]: unknown key "chunk" '):
        await client.call("create_sync_jobs", [{"kind": "k", "chunk": [1]}])
    with pytest.raises(chunkd.InvalidInputError, match=r"^jobs\[1\]\.run_at .* no time zone"):
        await client.call(
            "create_sync_jobs",
            [{"kind": "k", "chunks": [1]}, {"kind": "k", "chunks": [1], "run_at": datetime.now()}],
        )
    assert await job_count(conn) == 0


async def test_unknown_jobs_are_lookup_errors(client) -> None:
    missing = uuid.uuid4()
    for name in ("get_progress", "cancel", "retry_failed"):
        with pytest.raises(chunkd.JobNotFoundError) as absent:
            await client.call(name, missing)
        assert isinstance(absent.value, LookupError)
        assert str(absent.value) == f"no sync job {missing}"
    with pytest.raises(chunkd.InvalidInputError, match="'nope' is not a job id"):
        await client.call("get_progress", "nope")


async def test_retrying_a_cancelled_job_is_refused_as_bad_input(client) -> None:
    job = await client.call("create_sync_job", "k", [1])
    await client.call("cancel", job)
    with pytest.raises(chunkd.InvalidInputError) as refused:
        await client.call("retry_failed", job)
    assert str(refused.value) == f"sync job {job} is cancelled; its chunks cannot be retried"


async def test_a_database_without_the_schema_says_to_migrate(empty_database: str) -> None:
    connection = await asyncpg.connect(empty_database)
    try:
        with pytest.raises(chunkd.errors.SchemaVersionError, match="run `chunkd migrate`"):
            await chunkd.create_sync_job(connection, "k", [1])
    finally:
        await connection.close()
    with (
        psycopg.connect(empty_database, autocommit=True) as blocking,
        pytest.raises(chunkd.errors.SchemaVersionError, match="missing or older"),
    ):
        sync.get_progress(blocking, uuid.uuid4())


async def test_connections_of_the_wrong_kind_are_type_errors(psycopg_sync, conn) -> None:
    with pytest.raises(TypeError, match="conn must be an asyncpg Connection or Pool"):
        await chunkd.create_sync_job(psycopg_sync, "k", [1])
    with pytest.raises(TypeError, match="conn must be a psycopg Connection"):
        sync.create_sync_job(conn, "k", [1])
    with pytest.raises(TypeError, match=r"not builtins\.str"):
        await chunkd.get_progress("postgresql://", uuid.uuid4())  # type: ignore[arg-type]


async def test_progress_has_exactly_the_keys_of_get_sync_job_progress(conn) -> None:
    job = await chunkd.create_sync_job(conn, "k", [1])
    document = await conn.fetchval("SELECT chunkd.get_sync_job_progress($1)::text", job)
    assert {f.name for f in fields(chunkd.Progress)} == set(json.loads(document))
    progress = await chunkd.get_progress(conn, job)
    assert progress.sync_job_id == job and progress.created_at.tzinfo is not None
    with pytest.raises(AttributeError):
        progress.kind = "x"  # type: ignore[misc]  # frozen


def test_the_client_imports_no_driver_the_caller_does_not_use(database) -> None:
    """``import chunkd`` loads no driver; the blocking client on psycopg never loads asyncpg."""
    script = textwrap.dedent(
        f"""
        import sys
        import chunkd
        assert "asyncpg" not in sys.modules and "psycopg" not in sys.modules, "import chunkd"
        import psycopg
        from chunkd.client import sync
        with psycopg.connect({database.dsn!r}, autocommit=True) as conn:
            job = sync.create_sync_job(conn, "k", [1])
            assert sync.get_progress(conn, job).total_chunks == 1
        assert "asyncpg" not in sys.modules, sorted(m for m in sys.modules if "asyncpg" in m)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


async def test_the_callers_row_factories_and_record_classes_do_not_matter(database, conn) -> None:
    from psycopg.rows import dict_row

    class Row(asyncpg.Record):
        pass

    custom = await asyncpg.connect(database.dsn, record_class=Row)
    try:
        job = await chunkd.create_sync_job(custom, "k", [1])
        assert (await chunkd.get_progress(custom, job)).total_chunks == 1
    finally:
        await custom.close()
    async with await psycopg.AsyncConnection.connect(
        database.dsn, autocommit=True, row_factory=dict_row
    ) as dicts:
        assert await chunkd.create_sync_jobs(dicts, [{"kind": "k", "chunks": [1]}])
        assert (await chunkd.get_progress(dicts, job)).kind == "k"
    with psycopg.connect(database.dsn, autocommit=True, row_factory=dict_row) as blocking:
        assert sync.cancel(blocking, job) == 1
        assert sync.create_sync_job(blocking, "k", [1]) != job
    assert await job_count(conn) == 3


def test_the_client_is_re_exported_from_chunkd() -> None:
    names = [
        "create_sync_job",
        "create_sync_jobs",
        "get_progress",
        "cancel",
        "retry_failed",
        "wait",
    ]
    for name in names:
        assert getattr(chunkd, name) is getattr(chunkd.client, name)
        assert getattr(sync, name).__name__ == name, "the blocking API has the same names"
        assert name in chunkd.__all__ and name in sync.__all__
    assert chunkd.Progress is sync.Progress is chunkd.client.Progress
    assert issubclass(chunkd.InvalidInputError, ValueError)
    assert issubclass(chunkd.JobNotFoundError, LookupError)
