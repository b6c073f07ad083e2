"""Parsing ``chunkd enqueue`` input: a JSON array of chunk payloads, or NDJSON.

Pure (text in, list out), so the tests pin every error message without a database.
"""

from __future__ import annotations

import json
from typing import Any

from chunkd.errors import ChunkdError

__all__ = ["MAX_INPUT_BYTES", "parse_chunks", "parse_json_option"]

# Far above what create_sync_job accepts (16 MiB of chunks as stored): reading more than this
# only to be refused by the server would waste memory and a round trip.
MAX_INPUT_BYTES = 64 * 1024 * 1024

TERMINAL_STATUSES = frozenset({"completed", "partial_failure", "cancelled"})

_SCHEMA_MISSING = {"3F000", "42P01", "42883"}  # invalid schema, undefined table / function


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and jsonb) do not.
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _describe_json_error(exc: json.JSONDecodeError | ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
    return f"invalid JSON: {exc}"


def parse_chunks(data: bytes) -> list[Any]:
    """Chunk payloads from a JSON array or NDJSON (one payload per line), in order.

    Which format is decided by the text, not by a flag: if the whole input is one JSON value it
    must be an array (a single one-line value is also a one-line NDJSON file, so it is one
    chunk); otherwise every non-blank line must be one JSON value. Errors name the line (and
    column) as the user's editor counts them, so the first bad line can be found at once.
    """
    if len(data) > MAX_INPUT_BYTES:
        raise ChunkdError(
            f"input is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB; a job holds at most "
            "16 MiB of chunks: split it into several jobs"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ChunkdError(f"line {line}: input is not UTF-8 (byte offset {exc.start})") from None
    if not text.strip():
        raise ChunkdError("the input is empty: give a JSON array of chunk payloads or NDJSON")

    try:
        whole = _loads(text)
    except json.JSONDecodeError as exc:
        # "Extra data" after a complete first value: NDJSON (possibly of arrays).
        if text.lstrip().startswith("[") and not exc.msg.startswith("Extra data"):
            raise ChunkdError(_describe_json_error(exc)) from None
        return _parse_ndjson(text)
    except ValueError as exc:  # NaN / Infinity
        if text.lstrip().startswith("["):
            raise ChunkdError(_describe_json_error(exc)) from None
        return _parse_ndjson(text)

    if isinstance(whole, list):
        if not whole:
            raise ChunkdError("the input array is empty: a job needs at least one chunk")
        return _check_storable(whole)
    if len([line for line in text.splitlines() if line.strip()]) == 1:
        return _check_storable([whole])
    raise ChunkdError(
        f"the input is {_kind_of(whole)} spread over several lines, not a JSON array of chunk "
        "payloads; give a JSON array, or NDJSON with one payload per line"
    )


def _parse_ndjson(text: str) -> list[Any]:
    chunks: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            chunks.append(_loads(line))
        except json.JSONDecodeError as exc:
            raise ChunkdError(
                f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ChunkdError(f"line {number}: invalid JSON: {exc}") from None
    return _check_storable(chunks)


def _has_nul(value: Any) -> bool:
    # Iterative: the parser accepts nesting as deep as the recursion limit allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


def _check_storable(chunks: list[Any]) -> list[Any]:
    """Valid JSON that jsonb cannot store is caught here, with the chunk's position, rather
    than as the server's "unsupported Unicode escape sequence"."""
    for seq, chunk in enumerate(chunks):
        if _has_nul(chunk):
            raise ChunkdError(
                f"chunk {seq} (0-based) contains \\u0000, which PostgreSQL's jsonb cannot store"
            )
    return chunks


def parse_json_option(option: str, text: str) -> Any:
    """A JSON-valued option such as ``--payload``, with the column of the first mistake."""
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc}") from None
    if _has_nul(value):
        raise ChunkdError(f"{option} contains \\u0000, which PostgreSQL's jsonb cannot store")
    return value
