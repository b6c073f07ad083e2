"""Option types and helpers shared by the ``chunkd`` commands.

Kept apart from ``cli.py`` so the operator commands (``cli_ops.py``) can use them without
importing the module that ``python -m chunkd.cli`` runs as ``__main__``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from chunkd.settings import parse_duration

__all__ = ["DURATION", "LINE", "Duration", "Line", "dsn_option", "run_async"]

T = TypeVar("T")


class Duration(click.ParamType):
    """Seconds as a number or with a unit: 30, 30s, 500ms, 5m, 2h, 7d."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class Line(click.ParamType):
    """A value that may contain spaces (``exec:`` commands): from the environment, a list of
    them is one per line, not split on whitespace as click does by default."""

    name = "text"
    envvar_list_splitter = "\n"


LINE = Line()


def dsn_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dsn",
        envvar=["CHUNKD_DSN", "DATABASE_URL"],
        required=True,
        help="PostgreSQL connection URI.  [env: CHUNKD_DSN, DATABASE_URL]",
    )(func)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(coro)
