"""What one check of ``chunkd doctor`` found: a level, one line, and what to do about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Finding", "Level", "exit_code", "human_duration", "not_checked", "quote_literal"]


class Level(enum.Enum):
    """How bad a finding is; the worst one is ``chunkd doctor``'s exit code."""

    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"

    @property
    def code(self) -> int:
        """The exit code this level stands for: 0, 1 or 2."""
        return {"ok": 0, "warning": 1, "problem": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    """One check's result. ``message`` says what was found, ``advice`` what to do (empty when
    nothing); ``checked`` is False when the check could not run (then ``message`` says why);
    ``details`` carries the figures behind the line, for ``--json``."""

    check: str
    level: Level
    message: str
    advice: str = ""
    checked: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One line per check, whatever a check put in: a server error's DETAIL or HINT, a
        # value with a newline, joined onto the line.
        for name in ("message", "advice"):
            object.__setattr__(self, name, _one_line(getattr(self, name)))

    def line(self) -> str:
        """The finding as one line of text: level, check, message, and what to do."""
        text = f"{self.message}; {self.advice}" if self.advice else self.message
        return f"{self.level.value:<8} {self.check:<20} {text}"

    def as_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "level": self.level.value,
            "checked": self.checked,
            "message": self.message,
            "advice": self.advice,
            "details": self.details,
        }


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def not_checked(check: str, why: str, advice: str = "") -> Finding:
    """A check that could not run: a warning (nothing is known to be fine), saying why."""
    return Finding(check, Level.WARNING, f"not checked: {why}", advice, checked=False)


def exit_code(findings: list[Finding]) -> int:
    """0 when every finding is ok, 1 with a warning, 2 with a problem."""
    return max((f.level.code for f in findings), default=0)


def human_duration(seconds: float) -> str:
    """``0.4s``, ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def quote_literal(text: str) -> str:
    """``text`` as an SQL string literal, for statements a user copies from advice."""
    return "'" + text.replace("'", "''") + "'"
