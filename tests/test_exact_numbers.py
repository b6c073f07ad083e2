"""Numbers reach handlers exactly as enqueued (issue #16, item 5).

The input: a payload ``{"amount": 1234567890.123456789012345, "tiny": 1e-400,
"rate": 0.1000000000000000055511151231257827}``, which a float turns into 1234567890.1234567,
0.0 and 0.1. ``http:`` and ``exec:`` handlers must receive the stored JSON text unchanged,
Python handlers :class:`decimal.Decimal`, and ``chunkd enqueue`` must store it exactly and
refuse, with line and column, a number no reader could take as given (``1e400``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import pickle
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import ThreadingHTTPServer
from pathlib import Path
from uuid import uuid4

import pytest

from chunkd.chunk import Chunk, UndecodablePayloadError, dumps_json, loads_json
from daemon_helpers import run_chunkd, wait_until
from http_stub import StubHandler
from sql_helpers import status_counts

PAYLOAD_TEXT = (
    '{"amount": 1234567890.123456789012345, "tiny": 1e-400, '
    '"rate": 0.1000000000000000055511151231257827}'
)
EXACT = {
    "amount": Decimal("1234567890.123456789012345"),
    "tiny": Decimal("1e-400"),
    "rate": Decimal("0.1000000000000000055511151231257827"),
}


# --------------------------------------------------------------------------------------------
# The JSON functions and the Chunk (no database)
# --------------------------------------------------------------------------------------------


def test_loads_json_keeps_every_number_exact() -> None:
    value = loads_json(PAYLOAD_TEXT)
    assert value == EXACT
    assert all(type(v) is Decimal for v in value.values())
    big = "123456789012345678901234567890"  # beyond 64 bits: orjson would make it a float
    assert loads_json(f'{{"n": {big}, "m": 7, "s": "1.5"}}') == {"n": int(big), "m": 7, "s": "1.5"}
    huge = "9" * 5000  # beyond Python's 4,300-digit int() guard
    assert loads_json(f"[{huge}]") == [Decimal(huge)]
    assert type(loads_json('{"i": 12}')["i"]) is int
    with pytest.raises(json.JSONDecodeError):
        loads_json('{"a": ')


def test_dumps_json_writes_decimals_exactly_and_refuses_what_json_cannot_hold() -> None:
    text = dumps_json({"v": EXACT, "s": 'quote " and marker-like "chunkd-decimal-"', "f": 0.5})
    assert loads_json(text) == {
        "v": EXACT,
        "s": 'quote " and marker-like "chunkd-decimal-"',
        "f": Decimal("0.5"),
    }
    assert "1234567890.123456789012345" in text
    for bad in (Decimal("NaN"), Decimal("-Infinity"), float("inf")):
        with pytest.raises(ValueError):
            dumps_json([bad])
    with pytest.raises(TypeError):
        dumps_json({"x": object()})


def _claimed_chunk(payload_json: str, job_payload_json: str = "{}") -> Chunk:
    return Chunk.from_json(
        queue_id=uuid4(),
        chunk_id=uuid4(),
        sync_job_id=uuid4(),
        seq=3,
        attempt=1,
        kind='k"ind',
        payload_json=payload_json,
        job_payload_json=job_payload_json,
    )


def test_a_claimed_chunk_splices_the_stored_text_and_decodes_exactly() -> None:
    chunk = _claimed_chunk(PAYLOAD_TEXT, '{"tenant": 2.50}')
    wire = chunk.to_json()
    assert f'"payload":{PAYLOAD_TEXT}' in wire  # the stored text, byte for byte
    assert '"job_payload":{"tenant": 2.50}' in wire
    decoded = json.loads(wire, parse_float=Decimal)
    assert decoded["payload"] == EXACT and decoded["kind"] == 'k"ind'
    assert decoded["idempotency_key"] == chunk.idempotency_key
    assert chunk.payload == EXACT and chunk.job_payload == {"tenant": Decimal("2.50")}
    with pytest.raises(dataclasses.FrozenInstanceError):
        chunk.payload = {}  # type: ignore[misc]
    # A chunk built from Python values (a user's unit test) serialises them the same way.
    same = Chunk(
        chunk.queue_id, chunk.chunk_id, chunk.sync_job_id, 3, 1, 'k"ind', EXACT, {"tenant": 2.5}
    )
    assert same == chunk and json.loads(same.to_json(), parse_float=Decimal) == decoded


def test_a_chunk_survives_pickle_and_copy_decoded_or_not() -> None:
    chunk = _claimed_chunk(PAYLOAD_TEXT)
    for _round in ("undecoded", "decoded"):
        again = pickle.loads(pickle.dumps(chunk))
        assert again == chunk and again.to_json() == chunk.to_json()
        assert copy.copy(chunk) == chunk and copy.deepcopy(chunk) == chunk
        _ = chunk.payload, chunk.job_payload  # the second round: already decoded
    plain = Chunk(*[getattr(chunk, f) for f in ("queue_id", "chunk_id", "sync_job_id")], 1, 1,
                  "k", EXACT, {})  # fmt: skip
    assert pickle.loads(pickle.dumps(plain)) == plain


def test_a_payload_too_deep_for_python_fails_only_when_read() -> None:
    chunk = _claimed_chunk("[" * 5000 + "]" * 5000)
    assert chunk.to_json().count("[") == 5000  # http: and exec: handlers never decode it
    with pytest.raises(UndecodablePayloadError, match="nested too deeply"):  # fails at once
        _ = chunk.payload


# --------------------------------------------------------------------------------------------
# Through a real daemon: Python, exec: and http: handlers
# --------------------------------------------------------------------------------------------


class _EchoBody(StubHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append(body)
        self._reply(200, body, {"Content-Type": "application/json"})


@pytest.fixture
def echo_server() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Echo", (_EchoBody,), {"bodies": bodies})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", bodies
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


async def test_every_handler_kind_gets_the_numbers_as_enqueued(
    conn, start, tmp_path: Path, echo_server
) -> None:
    url, bodies = echo_server
    stdin_file = tmp_path / "stdin.json"
    jobs = {}
    for kind in ("py", "types", "exec", "http"):
        jobs[kind] = await conn.fetchval(
            "SELECT chunkd.create_sync_job($1, $2::jsonb, $3::jsonb)",
            kind,
            f"[{PAYLOAD_TEXT}]",
            PAYLOAD_TEXT,
        )
    daemon = start(
        "--handler", "py=bad_handlers:echo",
        "--handler", "types=bad_handlers:number_types",
        "--handler", f"exec=exec:tee {stdin_file}",
        "--handler", f"http={url}",
    )  # fmt: skip

    async def all_done() -> bool:
        return all([await status_counts(conn, j) == {"completed": 1} for j in jobs.values()])

    await wait_until(all_done, timeout_s=30, what="the four jobs")
    stored = await conn.fetchval(
        "SELECT c.payload::text FROM chunkd.chunked_sync_jobs c WHERE c.sync_job_id = $1",
        jobs["exec"],
    )
    assert (
        "1234567890.123456789012345" in stored and "0.1000000000000000055511151231257827" in stored
    )
    # exec: and http: got the text the database holds, unchanged, for payload and job payload.
    for received in (stdin_file.read_text(), bodies[0].decode()):
        assert f'"payload":{stored}' in received
        assert f'"job_payload":{stored}' in received
    # Every result holds the payload exactly (jsonb compares numerics exactly).
    for kind in ("py", "exec", "http"):
        exact = await conn.fetchval(
            "SELECT q.result -> 'payload' = c.payload AND q.result -> 'job_payload' = c.payload"
            " FROM chunkd.chunk_processing_queue q"
            " JOIN chunkd.chunked_sync_jobs c ON c.id = q.chunk_id"
            " WHERE q.parent_sync_job_id = $1",
            jobs[kind],
        )
        assert exact, kind
    types = await conn.fetchval(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1",
        jobs["types"],
    )
    assert types == {"amount": "Decimal", "tiny": "Decimal", "rate": "Decimal"}
    assert await daemon.stop() == 0


# --------------------------------------------------------------------------------------------
# chunkd enqueue
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [f"[{PAYLOAD_TEXT}, 1]".encode(), f"{PAYLOAD_TEXT}\n1\n".encode()],
    ids=["array", "ndjson"],
)
async def test_enqueue_stores_numbers_exactly(conn, database, text: bytes) -> None:
    result = await asyncio.to_thread(
        run_chunkd,
        "enqueue", "--dsn", database.dsn, "--kind", "k", "--payload", PAYLOAD_TEXT, "-",
        stdin=text,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    job = result.stdout.strip()
    exact = await conn.fetchval(
        "SELECT array_agg(c.payload = $2::jsonb ORDER BY c.seq) = '{t,f}'"
        " AND (SELECT j.payload FROM chunkd.sync_jobs j WHERE j.id = $1) = $2::jsonb"
        " FROM chunkd.chunked_sync_jobs c WHERE c.sync_job_id = $1",
        job,
        PAYLOAD_TEXT,
    )
    assert exact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'[{"a": 1},\n {"b": 2},\n {"c": 1e400}\n]', "line 3, column 8: number 1e400 is out"),
        (b'{"a": "1e400"}\n{"b": [1, -1e400]}\n', "line 2, column 11: number -1e400 is out"),
        (b"[" + b"9" * 400 + b"]", "line 1, column 2: number 99999999999999999999... is out of"),
        (b"[1e-20000]", "line 1, column 2: number 1e-20000 has more digits after the decimal"),
    ],
    ids=["array", "ndjson", "long-integer", "too-precise"],
)  # fmt: skip
async def test_enqueue_refuses_a_number_no_reader_gets_as_given(
    conn, database, text: bytes, expected: str
) -> None:
    result = await asyncio.to_thread(
        run_chunkd, "enqueue", "--dsn", database.dsn, "--kind", "k", "-", stdin=text
    )
    assert result.code == 2 and result.stdout == ""
    assert result.one_error_line().startswith(expected), result.stderr
    option = await asyncio.to_thread(
        run_chunkd,
        "enqueue", "--dsn", database.dsn, "--kind", "k", "--payload", '{"x":\n 1e400}', "-",
        stdin=b"[1]",
    )  # fmt: skip
    assert option.code == 2
    assert option.one_error_line().startswith("--payload: line 2, column 2: number 1e400")
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0


async def test_enqueue_names_a_lone_surrogate_instead_of_failing_later(conn, database) -> None:
    result = await asyncio.to_thread(
        run_chunkd, "enqueue", "--dsn", database.dsn, "--kind", "k", "-",
        stdin=b'[{"ok": "\\ud83d\\ude00"}, {"bad": "\\ud800"}]',
    )  # fmt: skip
    assert result.code == 2
    assert result.one_error_line() == (
        "chunk 1 (0-based) contains a lone surrogate \\ud800 (not Unicode), which "
        "PostgreSQL's jsonb cannot store"
    )
    assert await conn.fetchval("SELECT count(*) FROM chunkd.sync_jobs") == 0
    # The valid pair (an emoji) alone is stored.
    ok = await asyncio.to_thread(
        run_chunkd, "enqueue", "--dsn", database.dsn, "--kind", "k", "-",
        stdin=b'[{"ok": "\\ud83d\\ude00"}]',
    )  # fmt: skip
    assert ok.code == 0, ok.stderr
