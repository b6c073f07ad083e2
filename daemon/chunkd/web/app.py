"""The app factory: routes, the security middleware, error pages, static files."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from chunkd.errors import ChunkdError
from chunkd.web import api, pages
from chunkd.web.render import make_environment, render
from chunkd.web.security import Guard, Keys, Scope
from chunkd.web.settings import WebSettings

if TYPE_CHECKING:
    import asyncpg

    from chunkd.web.security import ASGIApp

__all__ = ["create_app"]


def create_app(settings: WebSettings, pool: asyncpg.Pool) -> Starlette:
    """The dashboard on ``pool`` (the caller opens and closes it). ``app.state.stopping`` is
    an event the server sets when it shuts down, so event streams end instead of holding the
    shutdown up."""
    keys = Keys(settings.token)
    app = Starlette(
        routes=[
            *pages.routes(),
            *api.routes(),
            Mount("/static", StaticFiles(packages=[("chunkd.web", "static")]), name="static"),
        ],
        middleware=[Middleware(Guard, keys=keys, refuse=_refusal)],
        exception_handlers={
            HTTPException: _http_error,  # type: ignore[dict-item]
            ChunkdError: _chunkd_error,  # type: ignore[dict-item]
        },
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.keys = keys
    app.state.templates = make_environment()
    app.state.stopping = asyncio.Event()
    return app


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return render(
        request, "error.html", {"status": exc.status_code, "message": exc.detail},
        status_code=exc.status_code,
    )  # fmt: skip


async def _chunkd_error(request: Request, exc: ChunkdError) -> Response:
    """A server refusal or an unreachable database: one line, never a traceback."""
    if _wants_json(request):
        return JSONResponse({"error": str(exc)}, status_code=503)
    return render(request, "error.html", {"status": 503, "message": str(exc)}, status_code=503)


def _refusal(scope: Scope, status: int, reason: str) -> ASGIApp:
    """What the Guard answers instead of the route: the login form (pages) or JSON (API)."""
    path = str(scope.get("path", ""))
    if path.startswith("/api/") or status != 401:
        headers = {"www-authenticate": 'Bearer realm="chunkd"'} if status == 401 else {}
        return JSONResponse({"error": reason}, status_code=status, headers=headers)
    return pages.login_form(scope, status_code=401)
