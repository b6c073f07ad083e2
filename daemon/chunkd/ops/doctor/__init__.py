"""``chunkd doctor``: read-only checks of a database and this host's view of it, each one
finding with what to do (:mod:`~chunkd.ops.doctor.findings`), the worst one the exit code.

- :mod:`~chunkd.ops.doctor.route`: the connection (a pooler in between, and its mode),
  LISTEN/NOTIFY, this host's clock against the database's;
- :mod:`~chunkd.ops.doctor.access`: the schema's version against this chunkd's, definitions
  changed by hand, the role's privileges against what each use needs;
- :mod:`~chunkd.ops.doctor.horizon`: the oldest xmin holder, sessions idle in transaction;
- :mod:`~chunkd.ops.doctor.tables`: dead rows and autovacuum per chunkd table;
- :mod:`~chunkd.ops.doctor.fleet`: the workers registry;
- :mod:`~chunkd.ops.doctor.run`: runs them all, a failing check becoming its own finding.
"""

from chunkd.ops.doctor.context import DoctorOptions
from chunkd.ops.doctor.findings import Finding, Level, exit_code
from chunkd.ops.doctor.run import run_doctor

__all__ = ["DoctorOptions", "Finding", "Level", "exit_code", "run_doctor"]
