"""The fenced code blocks of the Markdown pages, for the tests that run them.

A block whose opening fence follows a line ``<!-- not-run: reason -->`` is one the tests do
not run; the reason says why (and, where one exists, which test covers the same ground).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RUNNABLE", "Block", "blocks", "sql_statements", "stray_markers"]

# The languages whose blocks the tests run; every other language is shown, never run.
RUNNABLE = frozenset({"sql", "sh", "console"})

_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*$")
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")
_NOT_RUN = re.compile(r"^[ \t]*<!--[ \t]*not-run:(?P<reason>.*?)-->[ \t]*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, counted from 1
    lang: str
    text: str  # the lines inside the fence, de-indented, each ending with a newline
    not_run: str | None  # the reason, when the line before the fence marks it not run

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def _fences(lines: list[str], path: Path) -> list[tuple[int, int]]:
    """(opening, closing) line indexes of every fenced block."""
    found: list[tuple[int, int]] = []
    index = 0
    while index < len(lines):
        if _OPEN.match(lines[index]):
            end = next((j for j in range(index + 1, len(lines)) if _CLOSE.match(lines[j])), None)
            if end is None:
                raise ValueError(f"{path.name}:{index + 1}: a code fence that is never closed")
            found.append((index, end))
            index = end
        index += 1
    return found


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for start, end in _fences(lines, path):
        opening = _OPEN.match(lines[start])
        assert opening is not None
        indent = opening["indent"]
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start + 1 : end]]
        marker = _NOT_RUN.match(lines[start - 1]) if start else None
        found.append(
            Block(
                path=path,
                line=start + 1,
                lang=opening["lang"],
                text="".join(ln + "\n" for ln in body),
                not_run=marker["reason"].strip() if marker else None,
            )
        )
    return found


def stray_markers(path: Path) -> list[int]:
    """Lines with a not-run marker that is not right before a fence (it would mark nothing)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fences = _fences(lines, path)
    inside = {i for start, end in fences for i in range(start, end + 1)}
    before = {start - 1 for start, _ in fences}
    return [
        i + 1
        for i, line in enumerate(lines)
        if _NOT_RUN.match(line) and i not in inside and i not in before
    ]


def sql_statements(block: str) -> list[str]:
    """Statements of a block, comment-only pieces dropped.

    The pages' SQL has no dollar-quoted bodies, so a ';' at a line end ends a statement.
    """
    assert "$$" not in block, "the splitter below does not handle dollar quoting"
    pieces = [p.strip() for p in re.split(r";[ \t]*$", block, flags=re.MULTILINE)]
    return [p for p in pieces if p and not all(ln.startswith("--") for ln in p.splitlines())]
