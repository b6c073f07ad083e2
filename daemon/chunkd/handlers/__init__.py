"""Turning ``KIND=SPEC`` strings and the ``chunkd.handlers`` entry points into callables.

A handler is ``async def handle(chunk: Chunk) -> dict | None``. Specs are resolved once at
start-up so that a typo is a start-up error (exit 2), never a crash on the first chunk.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from chunkd.chunk import Chunk

__all__ = [
    "ENTRY_POINT_GROUP",
    "Handler",
    "HandlerError",
    "HandlerOptions",
    "HandlerRegistry",
    "load_handlers",
    "parse_handler_option",
]

ENTRY_POINT_GROUP = "chunkd.handlers"

Handler = Callable[[Chunk], Awaitable[Any]]


class HandlerError(ValueError):
    """A handler spec that cannot be resolved; the message is shown to the user as is."""


class Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class HandlerOptions:
    """What the built-in handlers need from the settings (kept here to avoid importing cli)."""

    timeout_s: float = 300.0
    http_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class HandlerRegistry:
    """Handlers by kind, plus whatever must be closed when the daemon stops."""

    handlers: dict[str, Handler]
    closables: list[Closable] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return sorted(self.handlers)

    async def aclose(self) -> None:
        for closable in self.closables:
            await closable.aclose()


def parse_handler_option(option: str) -> tuple[str, str]:
    """Split ``KIND=SPEC``; the kind must be non-empty and the spec present."""
    kind, sep, spec = option.partition("=")
    kind, spec = kind.strip(), spec.strip()
    if not sep or not kind or not spec:
        raise HandlerError(f"handler option {option!r} is not KIND=SPEC")
    return kind, spec


def _load_python(spec: str) -> Handler:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerError(f"handler spec {spec!r} is not module:function, http:URL or exec:CMD")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error is a bad spec, reported in one line
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise HandlerError(f"handler {spec!r} is not callable")
    if not inspect.iscoroutinefunction(target) and not inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callable objects
    ):
        raise HandlerError(f"handler {spec!r} must be an async function (async def)")
    handler: Handler = target  # async and callable, checked above; its signature is trusted
    return handler


def _resolve(spec: str, options: HandlerOptions, closables: list[Closable]) -> Handler:
    scheme, _, rest = spec.partition(":")
    if scheme in ("http", "https"):
        from chunkd.handlers.http import HttpHandler

        handler = HttpHandler(spec, headers=options.http_headers, timeout_s=options.timeout_s)
        closables.append(handler)
        return handler
    if scheme == "exec":
        from chunkd.handlers.exec import ExecHandler

        return ExecHandler(rest)
    return _load_python(spec)


def load_handlers(
    options_list: list[str], options: HandlerOptions | None = None, *, use_entry_points: bool = True
) -> HandlerRegistry:
    """Resolve ``--handler`` options and entry points; explicit options win over entry points."""
    options = options or HandlerOptions()
    specs: dict[str, str] = {}
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            specs[ep.name] = ep.value
    for option in options_list:
        kind, spec = parse_handler_option(option)
        specs[kind] = spec
    closables: list[Closable] = []
    handlers = {kind: _resolve(spec, options, closables) for kind, spec in specs.items()}
    return HandlerRegistry(handlers=handlers, closables=closables)
