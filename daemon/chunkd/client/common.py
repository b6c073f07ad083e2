"""What the async and the blocking client share: checking and encoding arguments, decoding
answers, and turning a server's refusal into a chunkd exception.

Pure functions, no driver: the driver is whatever connection the caller passes, recognised by
its class (:func:`driver_of`) without importing a driver the caller does not use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from chunkd.chunk import dumps_json
from chunkd.errors import (
    ChunkdError,
    ConnectionLostError,
    InvalidInputError,
    JobNotFoundError,
    SchemaVersionError,
)
from chunkd.observability.tracing import current_traceparent
from chunkd.times import RANGE, storable

__all__ = [
    "Driver",
    "driver_of",
    "is_closed",
    "job_id",
    "job_params",
    "jobs_param",
    "lost_connection",
    "translate_error",
]

Driver = Literal["asyncpg", "psycopg"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

_SCHEMA_MISSING = {"3F000", "42P01", "42883"}  # invalid schema, undefined table / function


def driver_of(conn: object) -> Driver | None:
    """Which driver made ``conn`` (its class or a base class lives in that package), or None."""
    for cls in type(conn).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in ("asyncpg", "psycopg"):
            return package  # type: ignore[return-value]  # one of the two literals
    return None


def unsupported(conn: object, expected: str) -> TypeError:
    name = f"{type(conn).__module__}.{type(conn).__qualname__}"
    return TypeError(f"conn must be {expected}, not {name}")


def job_id(job: UUID | str) -> UUID:
    """A job id as a UUID; a string that is not one is an :class:`InvalidInputError`."""
    if isinstance(job, UUID):
        return job
    if isinstance(job, str):
        try:
            return UUID(job.strip())
        except ValueError:
            pass
    raise InvalidInputError(f"{job!r} is not a job id (a UUID, as create_sync_job returns)")


def _json(name: str, value: Any) -> str:
    try:
        # dumps_json: the Decimals handlers get for non-integers are written exactly (a
        # planner handler passes a payload it was given straight on).
        return dumps_json(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} is not JSON: {exc}") from None


def _text(name: str, value: object, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInputError(f"{name} contains a NUL character, which PostgreSQL cannot store")
    return value


def _int32(name: str, value: object, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an int, got {type(value).__name__}")
    if not INT32_MIN <= value <= INT32_MAX:
        raise InvalidInputError(f"{name} must fit in 32 bits, got {value}")
    return value


def _run_at(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInputError(
            f"run_at must be a datetime with a time zone, got {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(
            f"run_at {value.isoformat()} has no time zone: give an aware datetime "
            "(e.g. datetime.now(UTC) + timedelta(minutes=15))"
        )
    if not storable(value):
        raise InvalidInputError(
            f"run_at must be a finite timestamp {RANGE} (None: at once), got {value.isoformat()}"
        )
    return value


def job_params(
    kind: object,
    chunks: object,
    payload: object,
    max_concurrency: object,
    max_attempts: object,
    priority: object,
    run_at: object,
    dedupe_key: object,
    open_job: object = False,
    on_finish_kind: object = None,
    max_per_second: object = None,
    concurrency_key: object = None,
    traceparent: object = None,
    label: object = None,
) -> tuple[str, tuple[Any, ...]]:
    """The named statement that creates the job and its bound values, checked for what the
    server could not say clearly (types, time zones, NUL characters); the rest is the server's
    to refuse. ``traceparent`` None: the current OpenTelemetry span's, if any. A job with a
    label goes through ``client_create_labeled_job`` (``create_sync_job`` has no label
    argument), any other through ``client_create_sync_job``."""
    if not isinstance(open_job, bool):
        raise InvalidInputError(f"open must be True or False, got {type(open_job).__name__}")
    values = (
        _text("kind", kind, optional=False),
        _json("chunks", chunks),
        _json("payload", {} if payload is None else payload),
        _int32("max_concurrency", max_concurrency, optional=True),
        _int32("max_attempts", max_attempts, optional=False),
        _int32("priority", priority, optional=False),
        _run_at(run_at),
        _text("dedupe_key", dedupe_key, optional=True),
        open_job,
        _text("on_finish_kind", on_finish_kind, optional=True),
        _rate("max_per_second", max_per_second),
        _text("concurrency_key", concurrency_key, optional=True),
        _traceparent(traceparent),
    )
    if label is None:
        return "client_create_sync_job", values
    return "client_create_labeled_job", (*values, _text("label", label, optional=False))


def _traceparent(value: object) -> str | None:
    """As given (the server checks its form), or the current OpenTelemetry span's for None."""
    given = _text("traceparent", value, optional=True)
    return current_traceparent() if given is None else given


def _rate(name: str, value: object) -> Decimal | None:
    """A rate in chunks per second (int, float or Decimal), sent exactly as a numeric."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise InvalidInputError(f"{name} must be a number of chunks per second, got {value!r}")
    return Decimal(str(value))


def jobs_param(jobs: Iterable[Mapping[str, Any]]) -> str:
    """``create_sync_jobs``' one argument: the job objects as a JSON array, ``run_at``
    datetimes as ISO 8601 text, the current OpenTelemetry span's ``traceparent`` in each job
    that gives none."""
    encoded: list[dict[str, Any]] = []
    for index, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise InvalidInputError(
                f"jobs[{index}] must be a mapping of create_sync_job's arguments, "
                f"got {type(job).__name__}"
            )
        spec = dict(job)
        if spec.get("traceparent") is None:
            spec["traceparent"] = current_traceparent()  # the current span's, if any
        if "run_at" in spec:
            try:
                at = _run_at(spec["run_at"])
            except InvalidInputError as exc:
                raise InvalidInputError(f"jobs[{index}].{exc}") from None
            spec["run_at"] = at.isoformat() if at is not None else None
        encoded.append(spec)
    return _json("jobs", encoded)


def progress_document(text: str | None, job: UUID) -> dict[str, Any]:
    """``get_sync_job_progress`` as JSON text (NULL: no such job)."""
    if text is None:
        raise JobNotFoundError(f"no sync job {job}")
    document: dict[str, Any] = json.loads(text)
    return document


def translate_error(exc: BaseException) -> ChunkdError | None:
    """The chunkd exception for a server error the caller can act on, or None to let the
    driver's own error through (connection lost, serialization failure, permission denied:
    what a caller's retry logic and alerts already know from its driver).

    Works on asyncpg's and psycopg's errors alike: both carry the SQLSTATE as ``sqlstate``.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return None
    diag = getattr(exc, "diag", None)  # psycopg: the primary message is in diag
    message = getattr(diag, "message_primary", None) or str(exc)
    message = (message.splitlines() or [type(exc).__name__])[0]
    ours = message.startswith("chunkd: ")
    message = message.removeprefix("chunkd: ")
    if sqlstate == "P0002" and ours:
        return JobNotFoundError(message)
    if sqlstate in _SCHEMA_MISSING:
        return SchemaVersionError(
            f"the chunkd schema is missing or older than this client ({message}): "
            "run `chunkd migrate`"
        )
    # Class 22 (data exception: bad values, e.g. invalid JSON or a NUL character), our limits
    # (54000) and refusals (55000: a cancelled job cannot be retried).
    if sqlstate.startswith("22") or (ours and sqlstate in ("54000", "55000")):
        return InvalidInputError(message)
    return None


# SQLSTATEs that mean the session is gone: class 08 (connection exception), the backend
# terminated (57P01 admin_shutdown: pg_terminate_backend or a fast shutdown; 57P02
# crash_shutdown) or a server that is not accepting connections (57P03).
_CONNECTION_CLASS = "08"
_SESSION_ENDED = {"57P01", "57P02", "57P03"}


def is_closed(conn: object) -> bool:
    """Whether ``conn`` is closed or broken; False when it cannot tell (an asyncpg pool, which
    replaces a broken connection by itself)."""
    if driver_of(conn) == "psycopg":
        return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False))
    closed = getattr(conn, "is_closed", None)
    return bool(closed()) if callable(closed) else False


def lost_connection(
    exc: BaseException, conn: object, call: str, *, was_open: bool
) -> ConnectionLostError | None:
    """A :class:`~chunkd.errors.ConnectionLostError` when ``exc``, raised by ``call`` (a
    function name, for the message) on ``conn``, means the connection was lost during the
    call; else None.

    Lost: a server error saying the session ended (SQLSTATE class 08, 57P01-57P03), a socket
    error (``OSError``: reset, refused, timed out), or any driver error after which ``conn``
    reports itself closed or broken (:func:`is_closed`), and asyncpg's
    ``InternalClientError``, which is what a cut mid-statement can leave
    (MagicStack/asyncpg#784, #1069). Not lost: a statement the server refused on a live
    connection, and a connection that was closed before the call (``was_open`` False: the
    driver's own error says so, and nothing was sent).
    """
    if not was_open:
        return None
    driver = driver_of(conn)
    sqlstate = getattr(exc, "sqlstate", None)
    cut = isinstance(sqlstate, str) and (
        sqlstate.startswith(_CONNECTION_CLASS) or sqlstate in _SESSION_ENDED
    )
    cut = cut or isinstance(exc, OSError) or is_closed(conn)
    if not cut and driver == "asyncpg":
        import asyncpg

        cut = isinstance(exc, asyncpg.InternalClientError)
    if not cut:
        return None
    diag = getattr(exc, "diag", None)
    reason = getattr(diag, "message_primary", None) or str(exc) or type(exc).__name__
    reason = reason.splitlines()[0]
    return ConnectionLostError(
        f"the connection to the database was lost during {call} ({reason}); whether it took "
        "effect is unknown: retry on a new connection (with the same dedupe_key, an enqueue "
        "is not repeated)"
    )
