"""Parsing ``chunkd enqueue`` input: a JSON array of chunk payloads, or NDJSON.

Pure (text in, list out), so the tests pin every error message without a database. Numbers
are read exactly (:class:`decimal.Decimal` for non-integers, never a float), and a number no
reader could take as given is refused with its line and column: beyond the range of a double
(``1e400``: JavaScript and most languages read it as infinity) or with more digits after the
point than PostgreSQL's numeric keeps (16,383: ``1e-20000``).
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

from chunkd.errors import ChunkdError

__all__ = ["MAX_INPUT_BYTES", "parse_chunks", "parse_json_option"]

# Far above what create_sync_job accepts (16 MiB of chunks as stored): reading more than this
# only to be refused by the server would waste memory and a round trip.
MAX_INPUT_BYTES = 64 * 1024 * 1024

# PostgreSQL's numeric (inside jsonb) keeps at most this many digits after the decimal point.
MAX_SCALE = 16383
# JSON strings (skipped) and numbers, as the JSON grammar has them: to find a number's column.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadNumber(ValueError):
    def __init__(self, token: str, problem: str) -> None:
        super().__init__(problem)
        self.token = token
        self.problem = problem


_OUT_OF_RANGE = (
    "is out of range: beyond ±1.8e308, where JSON readers that use doubles (JavaScript, most "
    "languages) get infinity"
)
_TOO_PRECISE = (
    f"has more digits after the decimal point than PostgreSQL's jsonb keeps ({MAX_SCALE})"
)


def _float(token: str) -> Decimal:
    """A non-integer number token, read exactly; raises _BadNumber for what no reader gets."""
    if math.isinf(float(token)):
        raise _BadNumber(token, _OUT_OF_RANGE)
    number = Decimal(token)
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_SCALE:
        raise _BadNumber(token, _TOO_PRECISE)
    return number


def _int(token: str) -> int:
    # Only a token of 309 digits or more can be beyond the largest double.
    if len(token) > 308 and math.isinf(float(token)):
        raise _BadNumber(token, _OUT_OF_RANGE)
    return int(token)


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and jsonb) do not.
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _locate(text: str, bad: _BadNumber) -> tuple[int, int]:
    """Line and column (1-based) of the first number token of ``text`` equal to the bad one."""
    for match in _TOKEN.finditer(text):
        if match[0] == bad.token:
            start = match.start()
            return text.count("\n", 0, start) + 1, start - text.rfind("\n", 0, start)
    return 1, 1  # not reached: the parser saw the token in this text


def _bad_number_line(text: str, bad: _BadNumber, *, line_offset: int = 0) -> str:
    line, column = _locate(text, bad)
    shown = bad.token if len(bad.token) <= 24 else bad.token[:20] + "..."
    return f"line {line + line_offset}, column {column}: number {shown} {bad.problem}"


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
    except _BadNumber as exc:
        if text.lstrip().startswith("["):
            raise ChunkdError(_bad_number_line(text, exc)) from None
        return _parse_ndjson(text)
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
        except _BadNumber as exc:
            raise ChunkdError(_bad_number_line(line, exc, line_offset=number - 1)) from None
        except json.JSONDecodeError as exc:
            raise ChunkdError(
                f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ChunkdError(f"line {number}: invalid JSON: {exc}") from None
    return _check_storable(chunks)


def _unstorable_text(value: Any) -> str | None:
    """What jsonb cannot store in a string of ``value``: a NUL, or a lone surrogate (an
    unpaired escape such as ``\\ud800``, which is not Unicode); None when all is storable."""
    # Iterative: the parser accepts nesting as deep as the recursion limit allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "\\u0000"
            lone = _LONE_SURROGATE.search(item)
            if lone:
                return f"a lone surrogate \\u{ord(lone[0]):04x} (not Unicode)"
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return None


def _check_storable(chunks: list[Any]) -> list[Any]:
    """Valid JSON that jsonb cannot store is caught here, with the chunk's position, rather
    than as the server's "unsupported Unicode escape sequence"."""
    for seq, chunk in enumerate(chunks):
        what = _unstorable_text(chunk)
        if what:
            raise ChunkdError(
                f"chunk {seq} (0-based) contains {what}, which PostgreSQL's jsonb cannot store"
            )
    return chunks


def parse_json_option(option: str, text: str) -> Any:
    """A JSON-valued option such as ``--payload``, with the column of the first mistake."""
    try:
        value = _loads(text)
    except _BadNumber as exc:
        raise ChunkdError(f"{option}: {_bad_number_line(text, exc)}") from None
    except json.JSONDecodeError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise ChunkdError(f"{option}: invalid JSON: {exc}") from None
    what = _unstorable_text(value)
    if what:
        raise ChunkdError(f"{option} contains {what}, which PostgreSQL's jsonb cannot store")
    return value
