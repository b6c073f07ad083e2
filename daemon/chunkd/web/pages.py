"""The HTML pages: jobs (a kind's page when filtered by kind), job detail (with its
fragments), workers, queue, login, actions on a job and on a kind.

A page's live parts are fragments of the same templates: ``?part=...`` returns just that part
and the page's script swaps it in every ``--refresh`` (no full-page reloads). A fragment that
will not change any more answers with ``X-Chunkd-Final: 1`` and the script stops polling it.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlencode
from uuid import UUID

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from chunkd.web import data, present
from chunkd.web.actions import ACTIONS, KIND_ACTIONS, run_action
from chunkd.web.render import render
from chunkd.web.security import SESSION_COOKIE, Scope, cookie_header, origin_ok

__all__ = ["login_form", "read_form", "routes"]

MAX_FORM_BYTES = 16 * 1024
FINAL = {"X-Chunkd-Final": "1"}


def routes() -> list[BaseRoute]:
    return [
        Route("/", lambda request: RedirectResponse("/jobs", status_code=303)),
        Route("/jobs", jobs),
        Route("/jobs/{job_id:uuid}", job),
        Route("/jobs/{job_id:uuid}/payload", job_payload),
        Route("/jobs/{job_id:uuid}/chunks/{seq:int}", chunk),
        Route("/jobs/{job_id:uuid}/chunks/{seq:int}/payload", chunk_payload),
        Route("/jobs/{job_id:uuid}/{action:str}", action, methods=["GET", "POST"]),
        Route("/kinds/{action:str}", kind_action, methods=["GET", "POST"]),
        Route("/workers", workers),
        Route("/queue", queue),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


def _choice(request: Request, name: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    value = request.query_params.get(name) or None
    return value if value in allowed else None


async def jobs(request: Request) -> Response:
    """The jobs list: filtered by kind (then it is the kind's page, with its pause and rate and
    the kind's actions) and status, and by a search (``q``: the start of a job id, kind, label
    or dedupe key). A search that cannot be run is one line and status 400."""
    pool = request.app.state.pool
    kind = request.query_params.get("kind") or None
    status = _choice(request, "status", data.JOB_STATUSES)
    search = request.query_params.get("q", "").strip() or None
    try:
        page = max(1, min(int(request.query_params.get("page", "1")), 100_000))
    except ValueError:
        page = 1
    problem = data.search_problem(search)
    if problem is None:
        listing = await data.jobs_listing(pool, kind=kind, status=status, page=page, search=search)
    else:
        listing = data.JobsListing(rows=[], has_next=False, facets=None, kinds=[])
    filters = {k: v for k, v in (("kind", kind), ("status", status), ("q", search)) if v}
    done = None
    if kind and request.query_params.get("done") in KIND_ACTIONS:
        n = request.query_params.get("n", "")
        done = KIND_ACTIONS[request.query_params["done"]].done.format(n=n if n.isdigit() else "?")
    context = {
        "listing": listing,
        "kind": kind,
        "status": status,
        "search": search,
        "search_problem": problem,
        "max_search": data.MAX_SEARCH_CHARS,
        "done": done,
        "page": page,
        "statuses": data.JOB_STATUSES,
        "query": lambda **changes: urlencode({**filters, **changes}),
        "part_url": f"/jobs?{urlencode({**filters, 'page': page, 'part': 'rows'})}",
    }
    code = 200 if problem is None else 400
    if request.query_params.get("part") == "rows":
        return render(request, "_job_rows.html", context, status_code=code)
    return render(request, "jobs.html", context, status_code=code)


async def _job_page(request: Request) -> data.JobPage:
    state = request.app.state
    page = await data.job_page(
        state.pool, request.path_params["job_id"], stale_after_s=state.settings.stale_after_s
    )
    if page is None:
        raise HTTPException(404, f"no sync job {request.path_params['job_id']}")
    return page


async def job(request: Request) -> Response:
    page = await _job_page(request)
    job_id: UUID = request.path_params["job_id"]
    context: dict[str, Any] = {"job": page, "job_id": job_id, "done": None}
    action_name = request.query_params.get("done")
    if action_name in ACTIONS:
        n = request.query_params.get("n", "")
        context["done"] = ACTIONS[action_name].done.format(n=n if n.isdigit() else "?")
    part = request.query_params.get("part")
    if part in ("summary", "history"):
        final = FINAL if page.terminal else None
        return render(request, f"_job_{part}.html", context, headers=final)
    return render(request, "job.html", context)


async def job_payload(request: Request) -> Response:
    stored = await data.job_payload(request.app.state.pool, request.path_params["job_id"])
    if stored is None:
        raise HTTPException(404, "no such job")
    return _payload(request, stored)


async def chunk_payload(request: Request) -> Response:
    stored = await data.chunk_payload(
        request.app.state.pool, request.path_params["job_id"], request.path_params["seq"]
    )
    if stored is None:
        raise HTTPException(404, "no such chunk")
    return _payload(request, stored)


def _payload(request: Request, stored: str) -> Response:
    text, truncated = present.shown_payload(stored)
    context = {
        "text": text,
        "truncated": truncated,
        "limit": present.PAYLOAD_LIMIT_CHARS,
        "stored_bytes": len(stored.encode()),
    }
    return render(request, "_payload.html", context)


async def chunk(request: Request) -> Response:
    job_id, seq = request.path_params["job_id"], request.path_params["seq"]
    detail = await data.chunk_detail(request.app.state.pool, job_id, seq)
    if detail is None:
        raise HTTPException(404, f"job {job_id} has no chunk {seq}")
    return render(request, "_chunk.html", {"detail": detail, "job_id": job_id})


async def read_form(request: Request) -> dict[str, str]:
    """An url-encoded form (the only kind these pages send), at most MAX_FORM_BYTES."""
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


async def checked_form(request: Request) -> dict[str, str]:
    """The form of a POST that passed the CSRF checks; 403 otherwise."""
    form = await read_form(request)
    keys = request.app.state.keys
    if not origin_ok(request.scope) or not keys.csrf_ok(
        request.cookies.get("chunkd_csrf"), form.get("csrf")
    ):
        raise HTTPException(403, "the form is stale or comes from another site: reload the page")
    return form


async def action(request: Request) -> Response:
    job_id: UUID = request.path_params["job_id"]
    chosen = ACTIONS.get(request.path_params["action"])
    if chosen is None:
        raise HTTPException(404, "no such page")
    pool = request.app.state.pool
    if request.method == "POST":
        await checked_form(request)
        n = await run_action(pool, chosen, job_id, request.app.state.settings.lock_wait_s)
        return RedirectResponse(
            f"/jobs/{job_id}?{urlencode({'done': chosen.name, 'n': n})}", status_code=303
        )
    state = await data.job_state(pool, job_id)
    if state is None:
        raise HTTPException(404, f"no sync job {job_id}")
    progress, flow = state
    context = {
        "action": chosen,
        "job_id": job_id,
        "progress": progress,
        "form_url": f"/jobs/{job_id}/{chosen.name}",
        "back_url": f"/jobs/{job_id}",
        "question": chosen.question.format(**progress),
        "applies": chosen.applies(progress, flow),
    }
    return render(request, "confirm.html", context)


async def kind_action(request: Request) -> Response:
    """A kind's action (``/kinds/{action}?kind=K``): GET is its confirmation page, POST (with
    the form's CSRF token) runs it and leads back to the kind's page."""
    chosen = KIND_ACTIONS.get(request.path_params["action"])
    if chosen is None:
        raise HTTPException(404, "no such page")
    kind = request.query_params.get("kind", "")
    if not kind or len(kind) > 200 or "\x00" in kind:
        raise HTTPException(400, "give the kind as ?kind=NAME (1-200 characters)")
    pool = request.app.state.pool
    kind_page = f"/jobs?{urlencode({'kind': kind})}"
    if request.method == "POST":
        await checked_form(request)
        n = await run_action(pool, chosen, kind, request.app.state.settings.lock_wait_s)
        return RedirectResponse(
            f"{kind_page}&{urlencode({'done': chosen.name, 'n': n})}", status_code=303
        )
    state = await data.kind_state(pool, kind)
    context = {
        "action": chosen,
        "kind": kind,
        "kind_state": state,
        "form_url": f"/kinds/{chosen.name}?{urlencode({'kind': kind})}",
        "back_url": kind_page,
        "question": chosen.question.format(kind=kind, **state),
        "applies": chosen.applies(state, None),
    }
    return render(request, "confirm.html", context)


async def workers(request: Request) -> Response:
    settings = request.app.state.settings
    pool = request.app.state.pool
    rows = await data.workers(pool, stale_after_s=settings.stale_after_s)
    context = {
        "workers": rows,
        "stale_after_s": settings.stale_after_s,
        "totals": await data.queue_totals(pool),
        "queue_statuses": data.QUEUE_STATUSES,
    }
    template = "_workers.html" if request.query_params.get("part") == "table" else "workers.html"
    return render(request, template, context)


async def queue(request: Request) -> Response:
    depth = await data.queue_depth(request.app.state.pool)
    template = "_queue.html" if request.query_params.get("part") == "table" else "queue.html"
    return render(request, template, {"depth": depth, "queue_statuses": data.QUEUE_STATUSES})


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never ``//host`` or a full URL (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    return target


def login_form(
    scope: Scope, *, status_code: int, error: str | None = None, next_path: str | None = None
) -> Response:
    """The login page; ``next_path`` (default: the page asked for) is where it leads."""
    request = Request(scope)
    wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    next_path = _safe_next(next_path or request.query_params.get("next") or wanted)
    if next_path in ("/login", "/logout"):
        next_path = "/jobs"
    return render(
        request, "login.html", {"next": next_path, "error": error}, status_code=status_code
    )


async def login(request: Request) -> Response:
    keys = request.app.state.keys
    if keys.token is None:
        return RedirectResponse("/jobs", status_code=303)
    if request.method == "GET":
        return login_form(request.scope, status_code=200)
    form = await checked_form(request)
    if not keys.token_ok(form.get("token", "")):
        await asyncio.sleep(0.5)  # a guessing script gets two tries a second per connection
        return login_form(
            request.scope, status_code=401, error="wrong token", next_path=form.get("next")
        )
    response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
    cookie = cookie_header(
        SESSION_COOKIE, keys.new_session(), secure=request.url.scheme == "https",
        max_age_s=12 * 3600,
    )  # fmt: skip
    response.raw_headers.append((b"set-cookie", cookie))
    return response


async def logout(request: Request) -> Response:
    await checked_form(request)
    response = RedirectResponse("/login", status_code=303)
    cookie = cookie_header(SESSION_COOKIE, "", secure=request.url.scheme == "https", max_age_s=0)
    response.raw_headers.append((b"set-cookie", cookie))
    return response
