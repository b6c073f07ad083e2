"""The child process of :func:`chunkd.testing.kill_mid_chunk`: imports the app, prints
``started``, runs one claimed chunk's handler (JSON request on stdin), prints ``finished``.
Its parent kills it in between; an error before ``started`` is its last stderr line."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any
from uuid import UUID

from chunkd.app import load_app
from chunkd.chunk import Chunk
from chunkd.runtime.invoke import invoke


async def _run(request: dict[str, Any]) -> None:
    row = request["row"]
    app = load_app(request["spec"])
    handler = app.handlers()[row["kind"]]
    chunk = Chunk.from_json(
        UUID(row["queue_id"]), UUID(row["chunk_id"]), UUID(row["sync_job_id"]), row["seq"],
        row["attempt"], row["kind"], payload_json=row["payload_json"],
        job_payload_json=row["job_payload_json"],
    )  # fmt: skip
    print("started", flush=True)
    called = await invoke(handler, chunk, timed_out=lambda: False, timeout_s=request["timeout_s"])
    print("finished", json.dumps({"error": called.outcome.error}), flush=True)


def main() -> None:
    try:
        asyncio.run(_run(json.loads(sys.stdin.read())))
    except Exception as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
