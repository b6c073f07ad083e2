"""What ``chunkd migrate`` says when a step does not get its locks: the sessions in its way as
they were (short transactions that came and went are not "free now"), and the relation the step
waited for, not another one its blocker holds."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from chunkd.db import connect
from chunkd.db import migrate as migrate_module
from chunkd.db.locks import LockWaitError
from chunkd.db.migrate import apply_migrations
from chunkd.db.sql_files import Migration, migrations
from lock_helpers import hold


def _plant(monkeypatch: pytest.MonkeyPatch, name: str, sql: str) -> Migration:
    planted = Migration(migrations()[-1].version + 1, name, sql)
    monkeypatch.setattr(migrate_module, "migrations", lambda: (*migrations(), planted))
    return planted


async def test_a_step_in_a_cycle_with_short_claims_is_not_told_they_are_free(
    database, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that locks ready, then scheduled, against sessions claiming back to back (each
    claim locks scheduled, then waits for ready): every try times out, and no transaction in
    its way lives for a second. The line said "they are free now: run it again", and running it
    again failed the same way; it says what happened, and who they were."""
    planted = _plant(
        monkeypatch,
        "wrong_order",
        "LOCK TABLE chunkd.ready IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(0.05);"
        " LOCK TABLE chunkd.scheduled IN ACCESS EXCLUSIVE MODE;",
    )
    claimers = [await connect(database.dsn, application_name="claimer") for _ in range(2)]
    pids = {await c.fetchval("SELECT pg_backend_pid()") for c in claimers}
    stop = asyncio.Event()

    async def claim(claimer: asyncpg.Connection) -> None:
        while not stop.is_set():
            async with claimer.transaction():  # a claim whose transaction lasts 10 ms
                await claimer.fetch("SELECT * FROM chunkd.claim_batch('w', 1, NULL, 60, NULL, 1)")
                await claimer.execute("SELECT pg_sleep(0.01)")

    tasks = [asyncio.ensure_future(claim(c)) for c in claimers]
    try:
        with pytest.raises(LockWaitError) as gave_up:
            await apply_migrations(conn, lock_wait_s=2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for claimer in claimers:
            await claimer.close()
    line = str(gave_up.value)
    assert "\n" not in line
    assert "free now" not in line, line
    found = re.fullmatch(
        rf"migration {planted.version} \(wrong_order\) waited 2 s for locks other sessions "
        r"hold; nothing was changed: (\d+) short transactions? of (\d) sessions? \(pid "
        r"([\d, ]+)\) held them in turn, none for 1 s or more, and no try \(of at most 200 ms\) "
        r"found them free; run it again when they are fewer, or with a longer lock wait",
        line,
    )
    assert found, line
    assert {int(p) for p in found[3].split(", ")} <= pids
    assert await conn.fetchval("SELECT count(*) FROM chunkd.schema_migrations WHERE version = $1",
                               planted.version) == 0  # fmt: skip


HOLDS_TWO = "LOCK TABLE chunkd.events IN SHARE MODE; LOCK TABLE chunkd.ready IN ROW EXCLUSIVE MODE"


async def test_the_line_names_the_relation_the_step_waited_for(
    database, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session idle in a transaction holds SHARE on events and ROW EXCLUSIVE on ready; a step
    that locks ready alone waited for ready, not for events (the stronger lock, which the line
    named before)."""
    planted = _plant(
        monkeypatch,
        "ready_probe",
        "LOCK TABLE chunkd.ready IN ACCESS EXCLUSIVE MODE;"
        " ALTER TABLE chunkd.ready ADD COLUMN probe int;",
    )
    holder = await hold(database.dsn, HOLDS_TWO)
    try:
        with pytest.raises(LockWaitError) as gave_up:
            await apply_migrations(conn, lock_wait_s=1.5)
    finally:
        await holder.close()
    line = str(gave_up.value)
    assert line.startswith(f"migration {planted.version} (ready_probe) waited 1.5 s"), line
    assert f"pid {holder.pid} (role " in line
    assert re.search(r"\) holds RowExclusiveLock on chunkd\.ready; end that transaction", line)


async def test_without_a_lock_table_first_the_line_names_every_lock_in_the_way(
    database, conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which relation a step without a LOCK TABLE first waits for is not known before it runs:
    the line names every lock the session holds on chunkd's relations."""
    _plant(monkeypatch, "ready_index", "CREATE INDEX ready_probe ON chunkd.ready (kind);")
    holder = await hold(database.dsn, HOLDS_TWO)
    try:
        with pytest.raises(LockWaitError) as gave_up:
            await apply_migrations(conn, lock_wait_s=1.5)
    finally:
        await holder.close()
    assert re.search(
        r"\) holds ShareLock on chunkd\.events, RowExclusiveLock on chunkd\.ready; end that",
        str(gave_up.value),
    ), str(gave_up.value)
