"""Finding an app by its ``module:attribute`` spec (``chunkd run myapp.tasks:app``), with the
project's directory on the import path, as ``uvicorn module:app`` and Celery find theirs."""

from __future__ import annotations

import os
import sys
from types import ModuleType

from chunkd.app.registry import App
from chunkd.handlers import HandlerError, import_module

__all__ = ["load_app", "put_on_import_path"]


def put_on_import_path(app_dir: str) -> str:
    """Puts ``app_dir`` (made absolute) first on ``sys.path`` unless it is there; returns it."""
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def load_app(spec: str, app_dir: str | None = None) -> App:
    """Imports ``module:attribute`` and returns the :class:`App` it names.

    Args:
        spec: ``myapp.tasks:app`` (the attribute may be dotted: ``myapp.tasks:apps.mail``).
        app_dir: the directory the caller put on the import path, named when the module is
            not found.

    Raises:
        HandlerError: one line saying what is wrong: not ``module:attribute``, the module does
            not import (the exception's type and message; its traceback is the ``__cause__``),
            no such attribute (the message lists the module's ``chunkd.App`` objects), the
            attribute is not a ``chunkd.App``, or the app has no handlers.
    """
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerError(f"app {spec!r} is not module:attribute (e.g. myapp.tasks:app)")
    module = import_module(module_name, "app", app_dir)
    target: object = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(
                f"module {module_name!r} has no app {attr_path!r} ({_apps_in(module, module_name)})"
            ) from None
    if not isinstance(target, App):
        kind = type(target).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise HandlerError(
            f"app {spec!r} is {article} {kind}, not a chunkd.App (app = chunkd.App() in "
            f"{module_name})"
        )
    if not target.kinds:
        # Typically the handlers live in a module that nothing imported.
        raise HandlerError(
            f'app {spec!r} has no handlers: register them with @app.handler("kind") in '
            f"{module_name} or in a module it imports"
        )
    return target


def _apps_in(module: ModuleType, module_name: str) -> str:
    """The ``chunkd.App`` objects at the top of ``module``, for the line of a wrong name."""
    names = sorted(name for name, value in vars(module).items() if isinstance(value, App))
    if names:
        return f"the chunkd.App objects in it: {', '.join(names)}"
    return f"it has no chunkd.App: app = chunkd.App() in {module_name}"
