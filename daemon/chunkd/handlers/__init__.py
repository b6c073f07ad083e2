"""Turning ``KIND=SPEC`` strings and the ``chunkd.handlers`` entry points into callables.

A handler is ``async def handle(chunk: Chunk) -> dict | None``, or a plain ``def``, which runs
in a worker thread. Specs are resolved once at start-up so that a typo is a start-up error
(exit 2), never a crash on the first chunk.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Protocol

from chunkd.chunk import Chunk

__all__ = [
    "ENTRY_POINT_GROUP",
    "Handler",
    "HandlerError",
    "HandlerOptions",
    "HandlerRegistry",
    "call_in_thread",
    "import_module",
    "is_async",
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


def import_module(module_name: str, what: str, app_dir: str | None = None) -> ModuleType:
    """Imports the module of a spec; any failure is one :class:`HandlerError` line with the
    exception's type and message (its traceback is the error's ``__cause__``).

    ``what`` names the spec ("handler", "app"); ``app_dir``: the directory put on the import
    path (``--app-dir``), named when the module is not found.
    """
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # any import-time error is a bad spec, reported in one line
        text = str(exc).strip().splitlines()
        line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing and (module_name + ".").startswith(missing + "."):
            # The module itself (or its package) is not there, not one it imports.
            where = os.path.abspath(app_dir) if app_dir is not None else "the import path"
            line += f" (looked in {where} and the installed packages; see --app-dir)"
        raise HandlerError(f"cannot import {what} module {module_name!r}: {line}") from exc


def is_async(function: Callable[..., Any]) -> bool:
    """An ``async def`` (or an object whose ``__call__`` is one)."""
    call = getattr(function, "__call__", None)  # noqa: B004 - async callable objects
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


async def call_in_thread(function: Callable[[Chunk[Any, Any]], Any], chunk: Chunk[Any, Any]) -> Any:
    """Runs a plain function in a worker thread (the loop's default executor). Cancellation
    (the chunk timeout, a lost lease) ends the wait at once, but the thread runs to its end:
    Python cannot stop a thread. An awaitable it returns (a decorated async function that does
    not look async) is awaited on the loop."""
    result = await asyncio.to_thread(function, chunk)
    if inspect.isawaitable(result):
        result = await result
    return result


def _load_python(spec: str, app_dir: str | None) -> Handler:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerError(f"handler spec {spec!r} is not module:function, http:URL or exec:CMD")
    target: Any = import_module(module_name, "handler", app_dir)
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise HandlerError(f"handler {spec!r} is not callable")
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise HandlerError(f"handler {spec!r} is a generator: a handler returns its result")
    if not is_async(target):
        function = target

        async def in_thread(chunk: Chunk[Any, Any]) -> Any:
            return await call_in_thread(function, chunk)

        return in_thread
    handler: Handler = target  # async and callable, checked above; its signature is trusted
    return handler


def _resolve(
    spec: str, options: HandlerOptions, closables: list[Closable], app_dir: str | None
) -> Handler:
    scheme, _, rest = spec.partition(":")
    if scheme in ("http", "https"):
        from chunkd.handlers.http import HttpHandler

        handler = HttpHandler(spec, headers=options.http_headers, timeout_s=options.timeout_s)
        closables.append(handler)
        return handler
    if scheme == "exec":
        from chunkd.handlers.exec import ExecHandler

        return ExecHandler(rest)
    return _load_python(spec, app_dir)


def load_handlers(
    options_list: list[str],
    options: HandlerOptions | None = None,
    *,
    use_entry_points: bool = True,
    app_dir: str | None = None,
    base: Mapping[str, Handler] | None = None,
) -> HandlerRegistry:
    """Resolve ``--handler`` options and entry points into handlers by kind.

    ``base``: handlers already resolved (an app's); they win over entry points, and explicit
    options win over both. ``app_dir``: the directory the caller put on the import path, for
    error messages.
    """
    options = options or HandlerOptions()
    base = base or {}
    specs: dict[str, str] = {}
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in base:
                specs[ep.name] = ep.value
    for option in options_list:
        kind, spec = parse_handler_option(option)
        specs[kind] = spec
    closables: list[Closable] = []
    handlers = {kind: h for kind, h in base.items() if kind not in specs}
    handlers.update(
        (kind, _resolve(spec, options, closables, app_dir)) for kind, spec in specs.items()
    )
    return HandlerRegistry(handlers=handlers, closables=closables)
