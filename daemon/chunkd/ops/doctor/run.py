"""Running every check of ``chunkd doctor`` in order, each on its own, read-only.

A check that fails (a privilege it lacks, a statement the server refuses, a lost connection)
becomes its own finding, "not checked" and why, and the others still run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from chunkd.db import DATABASE_ERRORS, DatabaseError, connection_failure
from chunkd.db.server_errors import describe_server_error
from chunkd.db.sql_files import queries
from chunkd.errors import ChunkdError
from chunkd.ops.doctor import access, fleet, horizon, route, tables
from chunkd.ops.doctor.context import Context, DoctorOptions, doctor_connection
from chunkd.ops.doctor.findings import Finding, Level, not_checked

__all__ = ["CHECKS", "run_doctor"]

Check = Callable[[Context], Awaitable[Finding]]

# (name, check, whether it runs in a read-only transaction): in the order they are printed.
CHECKS: tuple[tuple[str, Check, bool], ...] = (
    ("connection", route.connection, False),
    ("schema", access.schema_version, True),
    ("definitions", access.definitions_changed_by_hand, True),
    ("privileges", access.privileges, True),
    ("xmin-horizon", horizon.xmin_horizon, True),
    ("idle-in-transaction", horizon.idle_in_transaction, True),
    ("dead-tuples", tables.dead_tuples, True),
    # pg_notify() is allowed in a read-only transaction, but is sent only at commit: its own.
    ("listen-notify", route.listen_notify, False),
    ("clock", route.clock, False),
    ("workers", fleet.workers, True),
)


async def _one(name: str, check: Check, read_only: bool, ctx: Context) -> Finding:
    try:
        if not read_only:
            return await check(ctx)
        async with ctx.conn.transaction(readonly=True):
            return await check(ctx)
    except ChunkdError as exc:
        return not_checked(name, str(exc))
    except DATABASE_ERRORS as exc:
        return not_checked(name, _why(exc, ctx.role))


def _why(exc: BaseException, role: str | None) -> str:
    """What the database or the connection said, in one line."""
    lost = connection_failure(exc)
    if lost is not None:
        return f"the connection failed: {lost}"
    if isinstance(exc, DatabaseError):  # a server error: said in one line
        return describe_server_error(exc, role=role)
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _unusable(exc: BaseException) -> Finding:
    """The connection opened but its first statement failed: one problem finding, as every
    other check needs what that statement reads."""
    why = _why(exc, None)
    return Finding(
        "connection",
        Level.PROBLEM,
        f"connected, but the first statement failed, so nothing was checked: {why}",
        "if a pooler is in between, run chunkd doctor with --pooler auto to see its mode; "
        "otherwise look in the server's log",
        details={"error": why},
    )


async def run_doctor(dsn: str, options: DoctorOptions) -> list[Finding]:
    """Every check against the database of ``dsn``, in order. Nothing is written: each check
    runs in a read-only transaction, except the pooler probe, the NOTIFY to a channel of the
    doctor's own and the clock, which read no table. A database that cannot be reached, or
    a connection whose first statement fails, is one problem finding. Never raises for the
    database: everything it meets is a finding."""
    try:
        conn = await doctor_connection(dsn)
    except ChunkdError as exc:
        return [Finding("connection", Level.PROBLEM, str(exc), "check the DSN and the server")]
    except DATABASE_ERRORS as exc:  # the connection's own set-up refused
        return [_unusable(exc)]
    try:
        try:
            who = await conn.fetchrow(queries()["doctor_role"])
        except DATABASE_ERRORS as exc:
            return [_unusable(exc)]
        assert who is not None  # one row: the current role exists
        ctx = Context(conn=conn, dsn=dsn, options=options, who=who)
        return [await _one(name, check, ro, ctx) for name, check, ro in CHECKS]
    finally:
        await conn.close()
