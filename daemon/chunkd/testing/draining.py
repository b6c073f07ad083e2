"""``drain``: run every runnable chunk of an app's kinds now, in-process, through the real SQL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chunkd.app import App
from chunkd.testing.running import OUTCOMES, Run, runner

__all__ = ["ChunkFailedError", "DrainLimitError", "drain"]

# A rate limit's wait is real time; this bounds one wait, not the drain.
MAX_RATE_WAIT_S = 1.0


class ChunkFailedError(AssertionError):
    """A handler failed a chunk during ``drain(..., raise_errors=True)``. The message is the
    chunk's error as stored (``KeyError: 'page'``); ``__cause__`` is the exception the handler
    raised, with its traceback; ``run`` the delivery (its chunk, attempt, outcome)."""

    def __init__(self, run: Run) -> None:
        chunk = run.chunk
        super().__init__(
            f"chunk {chunk.seq} of job {chunk.sync_job_id} ({chunk.kind}, attempt "
            f"{chunk.attempt}) {'failed' if run.outcome == 'failed' else run.outcome}: "
            f"{run.error}"
        )
        self.run = run


class DrainLimitError(RuntimeError):
    """``drain`` ran ``max_chunks`` chunks and there were still more (a job that appends
    chunks forever, a handler that always asks to be retried)."""


async def drain(
    app: App,
    dsn: str,
    *,
    kinds: Sequence[str] | None = None,
    raise_errors: bool = False,
    fast_forward: bool = True,
    chunk_timeout_s: float = 300.0,
    max_chunks: int = 10_000,
) -> dict[str, int]:
    """Runs every runnable chunk of the app's kinds, one at a time, in this process: claimed
    with the daemon's claim, its handler called as the daemon calls it (typed payloads,
    plain functions in a thread, the chunk timeout), its outcome written with the daemon's
    fenced statements. Chunks that become runnable meanwhile (retries, continuations,
    follow-up jobs) run too; waits are skipped (``fast_forward``); rate limits are honoured.

    Args:
        app: whose handlers run.
        dsn: the test database (the ``chunkd_dsn`` fixture).
        kinds: only these of the app's kinds; None: all of them.
        raise_errors: raise :class:`ChunkFailedError` at the first chunk a handler fails
            (retryable or not), after its outcome is written; False: count it and go on.
        fast_forward: chunks waiting for a retry's backoff or their job's ``run_at`` become
            due now; False: they are left waiting.
        chunk_timeout_s: the chunk timeout in seconds, as ``--chunk-timeout``.
        max_chunks: stop with :class:`DrainLimitError` after this many chunks.

    Returns:
        How many outcomes of each kind were written: ``completed``, ``retried`` (a retry was
        scheduled), ``failed`` (for good), ``fenced`` (refused: the job was cancelled, say);
        every key is present.

    Raises:
        ChunkFailedError: ``raise_errors`` and a handler failed a chunk.
        DrainLimitError: more than ``max_chunks`` chunks.
        LookupError: a kind of ``kinds`` has no handler in the app.
    """
    handlers = app.handlers()
    chosen = list(kinds) if kinds is not None else list(handlers)
    for kind in chosen:
        app.registered(kind)
    counts = dict.fromkeys(OUTCOMES, 0)
    ran = 0
    async with runner(dsn, chosen, chunk_timeout_s) as run:
        while True:
            row, wait_s = await run.claim()
            if row is None:
                if wait_s > 0:
                    await asyncio.sleep(min(wait_s, MAX_RATE_WAIT_S))
                    continue
                if fast_forward and await run.fast_forward() > 0:
                    continue
                return counts
            if ran >= max_chunks:
                await run.release([row])
                raise DrainLimitError(
                    f"drain ran {max_chunks} chunks and more are runnable (max_chunks)"
                )
            ran += 1
            delivery = await run.deliver(handlers[row.kind], row)
            counts[delivery.outcome] += 1
            if raise_errors and delivery.error is not None:
                raise ChunkFailedError(delivery) from delivery.raised
