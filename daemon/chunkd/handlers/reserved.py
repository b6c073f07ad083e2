"""The reserved result key of the ``http:`` and ``exec:`` handlers: ``"$chunkd"``.

A JSON object result may carry ``"$chunkd": {"append": [chunk, ...]}`` at its top level: the
chunks are appended to the job with the completion (a continuation, as ``chunkd.Continue``
for Python handlers), and the key is removed from the stored result. Anything else under the
key fails the chunk at once: a typo must not silently drop a page.
"""

from __future__ import annotations

from typing import Any

from chunkd.chunk import Continue, PermanentError

__all__ = ["RESERVED_KEY", "continuation_of"]

RESERVED_KEY = "$chunkd"
_KNOWN = frozenset({"append"})


def continuation_of(value: Any) -> Any:
    """``value`` itself, or a ``Continue`` when it is an object carrying the reserved key."""
    if not isinstance(value, dict) or RESERVED_KEY not in value:
        return value
    control = value[RESERVED_KEY]
    result = {k: v for k, v in value.items() if k != RESERVED_KEY}
    if not isinstance(control, dict):
        raise PermanentError(f'"{RESERVED_KEY}" in a result must be an object like '
                             '{"append": [...]}')  # fmt: skip
    unknown = sorted(set(control) - _KNOWN)
    if unknown:
        raise PermanentError(f'unknown key(s) under "{RESERVED_KEY}": {", ".join(unknown)} '
                             '(known: append)')  # fmt: skip
    chunks = control.get("append", [])
    if not isinstance(chunks, list):
        raise PermanentError(f'"{RESERVED_KEY}".append must be a JSON array of chunk payloads')
    return Continue(result=result, chunks=chunks)
