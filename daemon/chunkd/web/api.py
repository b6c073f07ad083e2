"""The JSON API for applications: a job's progress, its chunk states, and a server-sent event
stream that pushes the progress until the job finishes.

- ``GET /api/jobs/{id}``: ``get_sync_job_progress(id)``, exactly its keys;
- ``GET /api/jobs/{id}/chunks``: ``{"chunks": n, "states": "ccrpf..."}``, one character per
  chunk by seq (``present.STATES``);
- ``GET /api/jobs/{id}/events``: ``text/event-stream``; an ``event: progress`` with the same
  document whenever it changes (checked every ``--refresh``), then ``event: end`` once the
  job is finished, and the stream closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from chunkd.errors import ChunkdError
from chunkd.ops import TERMINAL_STATUSES
from chunkd.web import data, present

if TYPE_CHECKING:
    import asyncpg

__all__ = ["HEARTBEAT_S", "routes"]

HEARTBEAT_S = 15.0


def routes() -> list[BaseRoute]:
    return [
        Route("/api/jobs/{job_id:uuid}", progress),
        Route("/api/jobs/{job_id:uuid}/chunks", chunks),
        Route("/api/jobs/{job_id:uuid}/events", events),
    ]


async def _progress_or_404(request: Request, job_id: UUID) -> dict[str, Any]:
    found = await data.job_progress(request.app.state.pool, job_id)
    if found is None:
        raise HTTPException(404, f"no sync job {job_id}")
    return found


async def progress(request: Request) -> Response:
    return JSONResponse(await _progress_or_404(request, request.path_params["job_id"]))


async def chunks(request: Request) -> Response:
    job_id: UUID = request.path_params["job_id"]
    total, states = await data.chunk_map(request.app.state.pool, job_id)
    if total == 0:
        raise HTTPException(404, f"no sync job {job_id}")
    return JSONResponse({"chunks": total, "states": states, "legend": present.STATES})


def _event(name: str, body: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


async def events(request: Request) -> Response:
    job_id: UUID = request.path_params["job_id"]
    first = await _progress_or_404(request, job_id)
    state = request.app.state
    return StreamingResponse(
        _stream(state.pool, job_id, first, state.settings.refresh_s, state.stopping),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(
    pool: asyncpg.Pool,
    job_id: UUID,
    first: dict[str, Any],
    refresh_s: float,
    stopping: asyncio.Event,
) -> AsyncIterator[str]:
    """Progress events until the job is finished or the server stops. A database error
    does not end the stream: it is reported as an ``event: error`` and the next read tries
    again (the browser's EventSource would otherwise reconnect and start over)."""
    yield f"retry: {int(max(refresh_s, 1.0) * 1000)}\n\n"
    current: dict[str, Any] | None = first
    last: dict[str, Any] | None = None
    quiet_s = 0.0
    while True:
        if current is not None and current != last:
            yield _event("progress", current)
            last, quiet_s = current, 0.0
            if current["overall_status"] in TERMINAL_STATUSES:
                yield _event("end", {"overall_status": current["overall_status"]})
                return
        elif quiet_s >= HEARTBEAT_S:
            yield ": still running\n\n"  # keeps proxies from closing an idle stream
            quiet_s = 0.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=refresh_s)
        if stopping.is_set():
            return
        quiet_s += refresh_s
        try:
            current = await data.job_progress(pool, job_id)
        except ChunkdError as exc:
            yield _event("error", {"error": str(exc)})
            current = None
            continue
        if current is None:  # purged meanwhile
            yield _event("end", {"overall_status": "gone"})
            return
