"""The pytest fixtures of :mod:`chunkd.testing`, loaded in every pytest run of an environment
where chunkd is installed (the ``pytest11`` entry point ``chunkd.testing``; without the
entry point, ``pytest -p chunkd.testing``; to turn it off, ``-p no:chunkd.testing``).

- ``chunkd_dsn``: the DSN of a fresh, migrated database on a real throwaway PostgreSQL, one per
  test, dropped afterwards (found as :mod:`chunkd.testing.server` says);
- ``chunkd_server``: that server, once per run (its ``admin_dsn``, ``dsn(name)``).

Both are synchronous, so they serve any test: plain, pytest-asyncio or anyio. When no
PostgreSQL can be had, a test that asks for one is skipped with one line saying what was
tried, or fails with it where the ``CI`` environment variable is set (a CI run that
skips every database test would pass while testing nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from chunkd.testing.server import TestServer

__all__ = ["chunkd_dsn", "chunkd_server"]


def _missing(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chunkd_server() -> Iterator[TestServer]:
    """The PostgreSQL server the test databases live on, for the whole run."""
    from chunkd.testing.server import (
        NoPostgresError,
        create_template,
        drop_template,
        in_thread,
        start_server,
    )

    try:
        server = start_server()
    except NoPostgresError as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        _missing(missing)  # outside the except: one line, not the exception chain
    try:
        in_thread(lambda: create_template(server))
        yield server
    finally:
        drop_template(server)
        server.close()


@pytest.fixture
def chunkd_dsn(chunkd_server: TestServer) -> Iterator[str]:
    """The DSN of a fresh database with the chunkd schema, for this test only."""
    from chunkd.testing.server import create_database, drop_database, in_thread

    name = in_thread(lambda: create_database(chunkd_server))
    try:
        yield chunkd_server.dsn(name)
    finally:
        in_thread(lambda: drop_database(chunkd_server, name))
