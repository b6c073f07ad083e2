"""What a test needs from the machine: found, or the test fails under CI and skips elsewhere.

``tests/run.sh`` installs every such resource (PostgreSQL, PgBouncer, libfaketime), so in CI a
missing one is a broken setup, never a reason to pass quietly.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["faketime_library", "missing", "pgbouncer_binary"]


def missing(message: str) -> NoReturn:
    """The test cannot get its resource: fail under ``CI``, skip elsewhere (saying why)."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (tests/run.sh installs it)", pytrace=False)
    pytest.skip(message)


def faketime_library() -> Path:
    """libfaketime, as Debian's ``faketime`` package installs it (any architecture)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        missing("needs libfaketime (apt-get install faketime)")
    return Path(found[0])


def pgbouncer_binary() -> str:
    """PgBouncer, as Debian's ``pgbouncer`` package installs it (in /usr/sbin)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        missing("needs PgBouncer (apt-get install pgbouncer)")
    return found
