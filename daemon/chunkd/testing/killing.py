"""``kill_mid_chunk``: the process running a handler is killed mid-handler (SIGKILL), then the
chunk is reaped and delivered again. The handler runs in a real child process
(:mod:`chunkd.testing.child`, importing the app by its ``module:attribute``), so nothing of it
survives the kill: no ``finally`` block, no cleanup; its connections drop and the server rolls
back its open transactions, as for a worker killed in production."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from typing import Any

from chunkd.app import App
from chunkd.runtime.invoke import chunk_of
from chunkd.testing.faults import (
    DEADLINE_S,
    Redelivery,
    SimulationError,
    Trigger,
    claim_first,
    kinds_of,
    redeliver,
    wait_for_trigger,
)
from chunkd.testing.running import Run, runner

__all__ = ["app_spec_of", "kill_mid_chunk"]


def app_spec_of(app: App) -> str:
    """``module:attribute`` of ``app``, found in the module that created it.

    Raises:
        SimulationError: it was created in ``__main__`` or is no attribute of that module.
    """
    module = sys.modules.get(app.module or "")
    if module is not None and app.module != "__main__":
        for name, value in vars(module).items():
            if value is app:
                return f"{app.module}:{name}"
    raise SimulationError(
        f"cannot tell how a child process imports this app (created in {app.module!r}): "
        "pass app_spec='module:attribute'"
    )


async def kill_mid_chunk(
    app: App,
    dsn: str,
    *,
    at: Trigger,
    kind: str | None = None,
    app_spec: str | None = None,
    chunk_timeout_s: float = 300.0,
) -> Redelivery:
    """Runs the next chunk's handler in a child process, kills it (SIGKILL) at ``at``, then
    lets the reaper return the chunk and runs it again here.

    Args:
        at: when to kill: seconds after the handler started, or a function (async or not)
            returning True when it is time (e.g. when the handler's first write is visible
            in the database), checked every 10 ms.
        app_spec: ``module:attribute`` the child imports the app by; None: found from where
            the app was created (:func:`app_spec_of`). The child has this process's import
            path, working directory and environment.

    Raises:
        SimulationError: no runnable chunk; the child could not start the handler (the
            message has its error); the handler finished before ``at``.
    """
    spec = app_spec or app_spec_of(app)
    async with runner(dsn, kinds_of(app, kind), chunk_timeout_s) as run:
        row = await claim_first(run, kind)
        request = {
            "spec": spec,
            "timeout_s": chunk_timeout_s,
            "row": {
                "queue_id": str(row.queue_id), "chunk_id": str(row.chunk_id),
                "sync_job_id": str(row.sync_job_id), "seq": row.seq, "attempt": row.attempt,
                "kind": row.kind, "payload_json": row.payload_json,
                "job_payload_json": row.job_payload_json,
            },
        }  # fmt: skip
        await _run_and_kill(request, at)
        return Redelivery(Run(chunk_of(row), "killed"), await redeliver(run, app, row))


async def _run_and_kill(request: dict[str, Any], at: Trigger) -> None:
    env = dict(os.environ)
    path = [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *path])
    with tempfile.TemporaryFile() as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chunkd.testing.child",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(json.dumps(request).encode())
            await child.stdin.drain()
            child.stdin.close()
            started = await asyncio.wait_for(child.stdout.readline(), DEADLINE_S)
            if started != b"started\n":
                await child.wait()
                stderr.seek(0)
                lines = stderr.read().decode(errors="replace").strip().splitlines()
                raise SimulationError(
                    "the child process could not start the handler: "
                    + (lines[-1] if lines else f"exit {child.returncode}")
                )
            finished = asyncio.create_task(child.stdout.readline())
            try:
                await wait_for_trigger(at, finished.done, "the handler returned")
            finally:
                finished.cancel()
        finally:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
