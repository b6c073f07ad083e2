"""JSON as chunkd reads and writes payloads and results: exactly, and within Python's depth.

Numbers are never changed on their way: integers stay :class:`int`, every other number becomes a
:class:`decimal.Decimal` (a float would turn ``1234567890.123456789012345`` into
``1234567890.1234567`` and ``1e-400`` into ``0.0``), and a ``Decimal`` is written back exactly.
Public through :mod:`chunkd.chunk`.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["MAX_RESULT_BYTES", "JSONTooDeepError", "dumps_json", "loads_json", "too_deep"]

#: A queue row is not a blob store: a result whose JSON is longer fails its chunk with a clear
#: error (the worker checks it; an ``exec:`` handler stops reading stdout past it).
MAX_RESULT_BYTES = 1024 * 1024

# A non-integer number token has a digit followed by '.', 'e' or 'E'; an integer of 19 digits
# or more may not fit the 64 bits orjson reads exactly (it turns bigger ones into floats).
# Strings can match too: that only sends a payload down the exact (slower) path needlessly.
_NOT_FOR_ORJSON = re.compile(r"[0-9][.eE]|[0-9]{19}")


class JSONTooDeepError(ValueError, RecursionError):
    """JSON nested deeper than Python's :mod:`json` can read or write: it recurses once per
    level and stops at the interpreter's recursion limit (about 1,000 levels; PostgreSQL's
    jsonb takes far deeper values). A :class:`ValueError`, as for any text that cannot be
    decoded, and a :class:`RecursionError`, as the standard library raises."""


def too_deep(what: str) -> str:
    """The message for ``what`` ("payload", "JSON") nested too deeply for Python."""
    return (
        f"{what} nested too deeply for Python to read (its json module stops at the recursion "
        f"limit, {sys.getrecursionlimit()} levels)"
    )


def _big_int(text: str) -> int | Decimal:
    # Python refuses int() of more than 4,300 digits (a guard against slow conversions).
    return int(text) if len(text) <= 4000 else Decimal(text)


def loads_json(text: str) -> Any:
    """JSON text to Python values, exactly: integers as :class:`int`, every other number as
    :class:`decimal.Decimal`, never a float.

    Raises :class:`ValueError` (:class:`json.JSONDecodeError`) for text that is not JSON and
    :class:`JSONTooDeepError` (a ``ValueError`` and a ``RecursionError``) for nesting deeper
    than Python's recursion limit.
    """
    if _NOT_FOR_ORJSON.search(text) is None:
        try:
            return orjson.loads(text)  # only integers of up to 18 digits: exact, and fast
        except orjson.JSONDecodeError:
            pass  # the standard library below gives the error its usual form
    try:
        try:
            return json.loads(text, parse_float=Decimal)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise
            return json.loads(text, parse_float=Decimal, parse_int=_big_int)
    except RecursionError:
        raise JSONTooDeepError(too_deep("JSON")) from None


def dumps_json(value: Any, *, ensure_ascii: bool = True) -> str:
    """Python values to compact JSON text; a :class:`~decimal.Decimal` is written exactly.

    Raises :class:`ValueError` for NaN or an infinity (JSON has neither), for circular
    references and (:class:`JSONTooDeepError`) for nesting deeper than Python's recursion
    limit, :class:`TypeError` for a value JSON cannot hold.
    """
    decimals: list[str] = []
    marker = ""

    def exact(obj: object) -> str:
        nonlocal marker
        if not isinstance(obj, Decimal):
            raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
        if not obj.is_finite():
            raise ValueError(f"Out of range float values are not JSON compliant: {obj}")
        if not marker:
            marker = f"chunkd-decimal-{secrets.token_hex(8)}-"
        decimals.append(str(obj))  # str() of a finite Decimal is a valid JSON number
        return f"{marker}{len(decimals) - 1}"

    try:
        text = json.dumps(
            value, allow_nan=False, ensure_ascii=ensure_ascii, separators=(",", ":"), default=exact
        )
    except RecursionError:
        raise JSONTooDeepError(too_deep("JSON")) from None
    if not decimals:
        return text
    return re.sub(f'"{marker}([0-9]+)"', lambda m: decimals[int(m[1])], text)
