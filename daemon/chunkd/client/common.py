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
from chunkd.errors import ChunkdError, InvalidInputError, JobNotFoundError, SchemaVersionError

__all__ = [
    "Driver",
    "driver_of",
    "job_id",
    "job_params",
    "jobs_param",
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
) -> tuple[Any, ...]:
    """The bound values of ``client_create_sync_job``, checked for what the server could not
    say clearly (types, time zones, NUL characters); the rest is the server's to refuse."""
    if not isinstance(open_job, bool):
        raise InvalidInputError(f"open must be True or False, got {type(open_job).__name__}")
    return (
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
    )


def _rate(name: str, value: object) -> Decimal | None:
    """A rate in chunks per second (int, float or Decimal), sent exactly as a numeric."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise InvalidInputError(f"{name} must be a number of chunks per second, got {value!r}")
    return Decimal(str(value))


def jobs_param(jobs: Iterable[Mapping[str, Any]]) -> str:
    """``create_sync_jobs``' one argument: the job objects as a JSON array, ``run_at``
    datetimes as ISO 8601 text."""
    encoded: list[dict[str, Any]] = []
    for index, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise InvalidInputError(
                f"jobs[{index}] must be a mapping of create_sync_job's arguments, "
                f"got {type(job).__name__}"
            )
        spec = dict(job)
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
