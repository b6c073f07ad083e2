"""Templates: the Jinja2 environment (package data, autoescaped) and the page helper that
gives every template what the layout needs (the CSRF token, the refresh interval, whether a
token protects this server)."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from chunkd.ops import format_rate
from chunkd.version import __version__
from chunkd.web import present
from chunkd.web.actions import available, kind_actions

__all__ = ["make_environment", "render"]


def make_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("chunkd.web", "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        duration=present.duration,
        rate=present.rate,
        timestamp=present.timestamp,
        short=lambda value: str(value)[:8],
        limit_rate=format_rate,
        tokens=present.tokens,
    )
    env.globals.update(
        version=__version__,
        eta=present.eta,
        states=present.STATES,
        available_actions=available,
        kind_actions=kind_actions,
    )
    return env


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    app_state = request.app.state
    state = request.scope.get("state", {})
    full = {
        "request": request,
        "path": request.url.path,
        "csrf_token": state.get("csrf_token", ""),
        "token_required": app_state.keys.token is not None,
        "authenticated": bool(state.get("authenticated")),
        "refresh_ms": int(app_state.settings.refresh_s * 1000),
        **(context or {}),
    }
    html = app_state.templates.get_template(template).render(full)
    return HTMLResponse(html, status_code=status_code, headers=headers)
