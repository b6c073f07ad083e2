"""chunkd.App: handlers registered in code, typed payloads (dataclasses, pydantic models),
plain functions in a thread, and enqueueing typed payloads in the caller's transaction."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pydantic
import pytest

import chunkd
import chunkd.testing
from chunkd import Chunk, InvalidInputError, PermanentError
from chunkd.app.payloads import PayloadError, payload_type


class Folder(Enum):
    INBOX = "inbox"
    SENT = "sent"


@dataclass
class Mailbox:
    address: str
    owner: UUID
    folders: list[Folder] = field(default_factory=lambda: [Folder.INBOX])


@dataclass
class Page:
    page: int
    since: datetime
    weight: float = 1.0
    price: Decimal = Decimal(0)
    tags: tuple[str, ...] = ()


class Invoice(pydantic.BaseModel):
    number: str
    amount: Decimal
    rate: float


OWNER = UUID("12345678-1234-5678-1234-567812345678")
SINCE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# --- payload types, without a database ---------------------------------------------------


def test_a_dataclass_round_trips_through_the_json_the_database_stores() -> None:
    page = Page(page=3, since=SINCE, weight=0.5, price=Decimal("12.50"), tags=("a", "b"))
    stored = payload_type(Page).dump(page)
    assert stored == {
        "page": 3, "since": "2026-01-02T03:04:05+00:00", "weight": 0.5,
        "price": Decimal("12.50"), "tags": ["a", "b"],
    }  # fmt: skip
    # As the daemon hands it back: numbers as int or Decimal, never a float.
    claimed = {**stored, "weight": Decimal("0.5")}
    assert payload_type(Page).load(claimed) == page
    box = Mailbox("ada@example.com", OWNER, [Folder.SENT])
    assert payload_type(Mailbox).dump(box) == {
        "address": "ada@example.com", "owner": str(OWNER), "folders": ["sent"],
    }  # fmt: skip
    assert payload_type(Mailbox).load(payload_type(Mailbox).dump(box)) == box


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"since": "2026-01-02T03:04:05+00:00"}, 'missing value for field "page"'),
        ({"page": "x", "since": "2026-01-02"}, 'wrong value type for field "page"'),
        ({"page": 1, "since": "2026-01-02", "pgae": 2}, 'can not match "pgae"'),
        ({"page": 1, "since": "yesterday"}, "Invalid isoformat string: 'yesterday'"),
        ([1, 2], "expected a JSON object, got an array"),
    ],
)
def test_a_dataclass_payload_that_does_not_match_says_which_field(value: Any, message: str) -> None:
    with pytest.raises(PayloadError, match="does not match Page: ") as caught:
        payload_type(Page).load(value)
    assert message in str(caught.value)


def test_a_pydantic_model_round_trips_and_says_which_field() -> None:
    invoice = Invoice(number="A-1", amount=Decimal("19.99"), rate=0.2)
    stored = payload_type(Invoice).dump(invoice)
    assert stored == {"number": "A-1", "amount": "19.99", "rate": 0.2}  # pydantic's own JSON
    assert payload_type(Invoice).load({**stored, "rate": Decimal("0.2")}) == invoice
    with pytest.raises(PayloadError) as caught:
        payload_type(Invoice).load({"number": "A-1", "amount": "lots"})
    assert str(caught.value) == (
        "does not match Invoice: amount: Input should be a valid decimal; rate: Field required"
    )


@pytest.mark.parametrize("tp", [dict, int, Page(1, SINCE), "Page"])
def test_a_payload_type_is_a_dataclass_or_a_pydantic_model(tp: Any) -> None:
    with pytest.raises(TypeError, match="must be a dataclass or a pydantic model class"):
        chunkd.App().handler("x", payload=tp)


def test_a_kind_is_registered_once_and_generators_are_refused() -> None:
    app = chunkd.App()

    @app.handler("mail")
    async def first(chunk: Chunk) -> None: ...

    with pytest.raises(ValueError, match=r"kind 'mail' already has a handler: .*first"):
        app.handler("mail")(first)
    with pytest.raises(ValueError, match="a kind must be 1-200 characters"):
        app.handler("")
    with pytest.raises(TypeError, match="is a generator"):

        @app.handler("pages")
        def pages(chunk: Chunk) -> Any:
            yield 1

    assert app.kinds == ["mail"]
    assert app.registered("mail").function is first  # the decorator returns it unchanged


def test_app_handler_without_its_kind_says_how_to_write_it() -> None:
    app = chunkd.App()
    with pytest.raises(TypeError) as info:

        @app.handler  # type: ignore[arg-type]
        async def sync_page(chunk: Chunk) -> None: ...

    assert str(info.value) == (
        '@app.handler needs the kind it handles: write @app.handler("kind") above sync_page, '
        "not @app.handler"
    )
    assert app.kinds == []


# --- handlers as the daemon calls them ----------------------------------------------------

app = chunkd.App()
threads: list[str] = []


@app.handler("page", payload=Page, job_payload=Mailbox)
async def handle_page(chunk: Chunk[Page, Mailbox]) -> dict[str, Any]:
    return {"page": chunk.payload.page, "owner": str(chunk.job_payload.owner)}


@app.handler("invoice", payload=Invoice)
def handle_invoice(chunk: Chunk[Invoice, Any]) -> dict[str, Any]:
    threads.append(threading.current_thread().name)
    return {"gross": chunk.payload.amount * (1 + Decimal(str(chunk.payload.rate)))}


async def test_typed_handlers_get_instances_and_a_plain_def_runs_in_a_thread() -> None:
    box = Mailbox("ada@example.com", OWNER)
    chunk = chunkd.testing.make_chunk(Page(7, SINCE), box, kind="page", app=app)
    assert isinstance(chunk.payload, Page) and chunk.job_payload == box
    assert await app.handlers()["page"](chunkd.testing.make_chunk(
        {"page": 7, "since": SINCE.isoformat()}, box, kind="page")) == {
        "page": 7, "owner": str(OWNER)}  # fmt: skip
    invoice = chunkd.testing.make_chunk({"number": "A", "amount": 10, "rate": 0.5}, kind="invoice")
    assert await app.handlers()["invoice"](invoice) == {"gross": Decimal("15.0")}
    assert threads[-1] != threading.current_thread().name


async def test_a_payload_that_does_not_validate_is_a_permanent_error() -> None:
    chunk = chunkd.testing.make_chunk({"page": "seven"}, {"address": "x"}, kind="page")
    with pytest.raises(PermanentError, match=r"^payload does not match Page: wrong value type"):
        await app.handlers()["page"](chunk)
    chunk = chunkd.testing.make_chunk({"page": 1, "since": "2026-01-01"}, {}, kind="page")
    with pytest.raises(PermanentError, match=r"^job payload does not match Mailbox: missing"):
        await app.handlers()["page"](chunk)


# --- enqueue ------------------------------------------------------------------------------


async def test_enqueue_writes_typed_payloads_in_the_callers_transaction(conn) -> None:  # type: ignore[no-untyped-def]
    box = Mailbox("ada@example.com", OWNER)
    async with conn.transaction():
        job = await app.enqueue(conn, "page", [Page(0, SINCE), Page(1, SINCE)], payload=box,
                                max_concurrency=1)  # fmt: skip
        jobs = await chunkd.testing.assert_enqueued(conn, kind="page", payload=box)
        assert jobs[0].id == job
        assert [c["page"] for c in jobs[0].chunks] == [0, 1]
    tx = conn.transaction()
    await tx.start()
    await app.enqueue(conn, "invoice", [Invoice(number="B", amount=Decimal("1.10"), rate=0)])
    await tx.rollback()  # rolled back with the caller's writes
    await chunkd.testing.refute_enqueued(conn, kind="invoice")


@pytest.mark.parametrize(
    ("kind", "chunks", "payload", "message"),
    [
        ("nope", [{}], None, "this app has no handler for kind 'nope' (its kinds: invoice, page)"),
        ("page", [Page(0, SINCE), Mailbox("a", OWNER)], None,
         "chunks[1] must be a Page, got Mailbox"),
        ("page", [{"page": "x", "since": "2026-01-01"}], None,
         'chunks[0] does not match Page: wrong value type for field "page"'),
        ("page", [Page(0, SINCE)], {"address": 1}, "payload does not match Mailbox"),
        ("page", "not a list", None, "chunks must be a list, got str"),
    ],
)  # fmt: skip
async def test_enqueue_refuses_what_the_handler_could_not_read(
    conn: asyncpg.Connection, kind: str, chunks: Any, payload: Any, message: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        await app.enqueue(conn, kind, chunks, payload=payload)
    assert message in str(caught.value)
    await chunkd.testing.refute_enqueued(conn)


async def test_an_app_handler_runs_under_the_daemon_code_in_drain(database) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(database.dsn)
    try:
        job = await app.enqueue(conn, "page", [Page(2, SINCE)], payload=Mailbox("a", OWNER))
        counts = await chunkd.testing.drain(app, database.dsn)
        assert counts["completed"] == 1
        assert await chunkd.testing.results(conn, job) == [{"page": 2, "owner": str(OWNER)}]
    finally:
        await conn.close()


def test_chunk_is_generic_and_with_payloads_keeps_the_ids_and_the_stored_json() -> None:
    assert Chunk[Page, Mailbox].__origin__ is Chunk  # type: ignore[attr-defined]
    chunk = Chunk.from_json(uuid4(), uuid4(), uuid4(), 3, 2, "k", payload_json='{"a": 1.50}',
                            job_payload_json="{}")  # fmt: skip
    typed = chunk.with_payloads("typed", None)
    assert (typed.payload, typed.idempotency_key, typed.seq) == ("typed", chunk.idempotency_key, 3)
    assert typed.to_json() == chunk.to_json()  # http:/exec: would get the stored text
