"""The daemon (``chunkd run``): one asyncio task per job, data flowing one way.

listener / timer / poll → :mod:`~chunkd.runtime.claimer` (claims into free slots) →
:mod:`~chunkd.runtime.worker` (runs the handler under a timeout) →
:mod:`~chunkd.runtime.outcomes` (writes completions and failures) → the database.
Beside them: :mod:`~chunkd.runtime.heartbeat` (renews leases),
:mod:`~chunkd.runtime.reaper` (returns chunks of dead workers),
:mod:`~chunkd.runtime.depth` (queue-depth metrics), :mod:`~chunkd.runtime.inflight` (what
this process holds, and until when it can show it), :mod:`~chunkd.runtime.health` (database
errors, one line per fault), :mod:`~chunkd.runtime.stall` (event-loop stalls),
:mod:`~chunkd.runtime.stop` (the graceful stop), :mod:`~chunkd.runtime.finished` (a traced
job's end on its trace, while the daemon traces), and :mod:`~chunkd.runtime.supervisor`,
which starts, restarts and stops them all.
"""
