"""Testing handlers: a real throwaway PostgreSQL per test, the queued chunks run now,
assertions on what was enqueued, chunks made by hand, and the failures of at-least-once
delivery simulated on purpose. Also a pytest plugin (:mod:`chunkd.testing.plugin`), loaded by
the ``pytest11`` entry point (or ``pytest -p chunkd.testing``): the ``chunkd_dsn`` fixture.

- :func:`drain` (:mod:`~chunkd.testing.draining`): every runnable chunk through the real SQL and
  the app's handlers, in this process;
- :func:`assert_enqueued`, :func:`refute_enqueued`, :func:`results`
  (:mod:`~chunkd.testing.enqueued`);
- :func:`make_chunk` (:mod:`~chunkd.testing.chunks`): a Chunk as the daemon builds it;
- :func:`run_twice`, :func:`lose_lease` (:mod:`~chunkd.testing.faults`) and
  :func:`kill_mid_chunk` (:mod:`~chunkd.testing.killing`): one chunk delivered twice, its lease
  lost mid-handler, its process killed mid-handler;
- :mod:`~chunkd.testing.server`: finding or starting the PostgreSQL.

The names below are imported on first use: loading the plugin into every pytest run costs
nothing until a test uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    # The fixtures, so that `-p chunkd.testing` registers them from this module.
    from chunkd.testing.plugin import chunkd_dsn, chunkd_server
except ModuleNotFoundError as exc:  # no pytest: the helpers below still work
    if exc.name != "pytest":
        raise

if TYPE_CHECKING:
    from chunkd.testing.chunks import make_chunk
    from chunkd.testing.draining import ChunkFailedError, DrainLimitError, drain
    from chunkd.testing.enqueued import Enqueued, assert_enqueued, refute_enqueued, results
    from chunkd.testing.faults import Redelivery, SimulationError, lose_lease, run_twice
    from chunkd.testing.killing import kill_mid_chunk
    from chunkd.testing.running import Run

__all__ = [
    "ChunkFailedError",
    "DrainLimitError",
    "Enqueued",
    "Redelivery",
    "Run",
    "SimulationError",
    "assert_enqueued",
    "chunkd_dsn",
    "chunkd_server",
    "drain",
    "kill_mid_chunk",
    "lose_lease",
    "make_chunk",
    "refute_enqueued",
    "results",
    "run_twice",
]

_MODULE_OF = {
    "make_chunk": "chunks",
    "ChunkFailedError": "draining",
    "DrainLimitError": "draining",
    "drain": "draining",
    "Enqueued": "enqueued",
    "assert_enqueued": "enqueued",
    "refute_enqueued": "enqueued",
    "results": "enqueued",
    "Redelivery": "faults",
    "SimulationError": "faults",
    "lose_lease": "faults",
    "run_twice": "faults",
    "kill_mid_chunk": "killing",
    "Run": "running",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'chunkd.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chunkd.testing.{module}"), name)
    globals()[name] = value
    return value
