"""Handlers declared in code: :class:`~chunkd.app.registry.App` (``@app.handler(kind)``), typed
payloads (:mod:`~chunkd.app.payloads`: dataclasses or pydantic models), and finding an app by
its ``module:attribute`` spec (:mod:`~chunkd.app.loading`)."""

from chunkd.app.loading import load_app, put_on_import_path
from chunkd.app.payloads import PayloadError
from chunkd.app.registry import App, Registered

__all__ = ["App", "PayloadError", "Registered", "load_app", "put_on_import_path"]
