"""The pytest fixtures of :mod:`chunkd.testing`, loaded in every pytest run of an environment
where chunkd is installed (the ``pytest11`` entry point ``chunkd.testing``; without the
entry point, ``pytest -p chunkd.testing``; to turn it off, ``-p no:chunkd.testing``).

- ``chunkd_dsn``: the DSN of a fresh, migrated database on a real throwaway PostgreSQL, one per
  test, dropped afterwards (found as :mod:`chunkd.testing.server` says);
- ``chunkd_server``: that server, once per run (its ``admin_dsn``, ``dsn(name)``).

Both are synchronous, so they serve any test: plain, pytest-asyncio or anyio. When no
PostgreSQL can be had, a test that asks for one is skipped with one line saying what was
tried, or fails with it where the ``CI`` environment variable is set (a CI run that
skips every database test would pass while testing nothing). A ``CHUNKD_TEST_DSN`` that
cannot be reached or whose role may not create databases fails with one line, CI or not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
        unusable = _unusable(server, lambda: in_thread(lambda: create_template(server)))
        if unusable:
            _refused(server, unusable)
        yield server
    finally:
        drop_template(server)
        server.close()


def _unusable(server: TestServer, make_template: Callable[[], object]) -> str:
    """Runs ``make_template``; the one line saying why the server cannot be used when it
    cannot be reached or its role may not create databases, else ''. Other errors (a bug, a
    failed migration) propagate with their traceback."""
    import asyncpg

    from chunkd.errors import ConnectError

    try:
        make_template()
    except ConnectError as exc:  # unreachable, refused, a wrong password: the DSN redacted
        reason = str(exc)
    except asyncpg.InsufficientPrivilegeError as exc:
        reason = f"{exc} (its role needs CREATEDB)"
    else:
        return ""
    return f"{server.source} cannot be used for the tests: {reason.splitlines()[0]}"


def _refused(server: TestServer, message: str) -> NoReturn:
    """A server named by ``CHUNKD_TEST_DSN`` that cannot be used fails the test (it was asked
    for by name: skipping would pass a run that tested nothing); one that chunkd found or
    started goes the way of no server at all (:func:`_missing`)."""
    if server.source == "CHUNKD_TEST_DSN":
        pytest.fail(message, pytrace=False)
    _missing(message)


@pytest.fixture
def chunkd_dsn(chunkd_server: TestServer) -> Iterator[str]:
    """The DSN of a fresh database with the chunkd schema, for this test only."""
    from chunkd.testing.server import create_database, drop_database, in_thread

    name = in_thread(lambda: create_database(chunkd_server))
    try:
        yield chunkd_server.dsn(name)
    finally:
        in_thread(lambda: drop_database(chunkd_server, name))
