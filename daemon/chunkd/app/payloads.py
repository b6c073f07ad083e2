"""Typed payloads: a dataclass or a pydantic model to the JSON a chunk stores, and back.

A payload type is a dataclass (checked by dacite: every field present with its type, no key
the class does not have) or a pydantic model (its own validation; pydantic is the optional
extra ``chunkd[pydantic]``, and a pydantic dataclass counts as a model). What the database
holds is JSON: a dataclass is written field by field (``Decimal`` exactly, ``UUID`` as text,
dates and times in ISO 8601, an ``Enum`` as its value), a model as
``model_dump(mode="json", by_alias=True)`` writes it (pydantic writes a ``Decimal`` as a
string). Reading back, a handler's numbers arrive as ``int`` or ``Decimal`` (never a float):
a ``float`` field takes either, a ``Decimal`` field an ``int`` too.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Generic, TypeVar
from uuid import UUID

import dacite

__all__ = ["PayloadError", "PayloadType", "as_json_values", "payload_type", "to_json_values"]

T = TypeVar("T")


class PayloadError(ValueError):
    """A payload that does not match its type; the message says which field and why."""


def _float(value: Any) -> Any:
    # The daemon hands non-integers over as Decimal (and integers as int): a float field
    # takes both. Anything else is left for dacite's type check to refuse.
    is_number = isinstance(value, int | Decimal) and not isinstance(value, bool)
    return float(value) if is_number else value


def _decimal(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))  # as written: 1.1, not 1.100000000000000088817841970012523
    return Decimal(value) if isinstance(value, int) else value


def _iso(kind: type[date] | type[time]) -> Any:
    def parse(value: Any) -> Any:
        return kind.fromisoformat(value) if isinstance(value, str) else value

    return parse


_DACITE = dacite.Config(
    strict=True,
    cast=[UUID, enum.Enum, tuple],
    type_hooks={
        float: _float,
        Decimal: _decimal,
        datetime: _iso(datetime),
        date: _iso(date),
        time: _iso(time),
    },
)


def to_json_values(value: Any, where: str = "payload") -> Any:
    """A dataclass instance (or what its fields hold) as JSON values; ``Decimal`` kept as is
    (``chunkd.chunk.dumps_json`` writes it exactly). Raises TypeError for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json_values(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
    if value is None or isinstance(value, str | int | float | Decimal):
        return value  # bool is an int
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key that is not a str: {key!r}")
            out[key] = to_json_values(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [to_json_values(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, enum.Enum):
        return to_json_values(value.value, where)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    raise TypeError(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def as_json_values(value: Any) -> Any:
    """An instance of a payload type as the JSON values it is stored as (a pydantic model as
    ``model_dump(mode="json", by_alias=True)``, a dataclass field by field); anything else
    as it is."""
    if isinstance(value, type):
        return value
    if _is_pydantic(type(value)) and hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True)
    if dataclasses.is_dataclass(value):
        if hasattr(value, "__pydantic_validator__"):
            return PayloadType(type(value)).dump(value)
        return to_json_values(value)
    return value


def _is_pydantic(tp: type) -> bool:
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:
        return False  # a pydantic model would have imported it
    return (isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)) or hasattr(
        tp, "__pydantic_validator__"
    )


class PayloadType(Generic[T]):
    """How one payload type is read from and written to JSON."""

    def __init__(self, tp: type[T]) -> None:
        self.type = tp
        self.name = getattr(tp, "__qualname__", repr(tp))
        self._adapter: Any = None
        if _is_pydantic(tp):
            import pydantic

            self._adapter = pydantic.TypeAdapter(tp)

    def load(self, value: Any) -> T:
        """``value`` (decoded JSON) as an instance of the type.

        Raises:
            PayloadError: it does not match; the message names the fields.
        """
        if self._adapter is not None:
            import pydantic

            try:
                loaded: T = self._adapter.validate_python(value)
            except pydantic.ValidationError as exc:
                raise PayloadError(f"does not match {self.name}: {_pydantic_errors(exc)}") from None
            return loaded
        if not isinstance(value, Mapping):
            raise PayloadError(
                f"does not match {self.name}: expected a JSON object, got {_json_type(value)}"
            )
        try:
            return dacite.from_dict(self.type, dict(value), config=_DACITE)
        except (dacite.DaciteError, ValueError, TypeError) as exc:
            raise PayloadError(f"does not match {self.name}: {exc}") from None

    def dump(self, value: Any, where: str = "payload") -> Any:
        """An instance of the type (or a mapping that validates as one) as JSON values.

        Raises:
            PayloadError: ``value`` is neither, or does not validate; or it holds a value JSON
                cannot (the message says where).
        """
        if isinstance(value, Mapping) and not isinstance(value, self.type):
            try:
                value = self.load(value)
            except PayloadError as exc:
                raise PayloadError(f"{where} {exc}") from None
        if not isinstance(value, self.type):
            raise PayloadError(f"{where} must be a {self.name}, got {type(value).__name__}")
        if self._adapter is not None:
            return self._adapter.dump_python(value, mode="json", by_alias=True)
        try:
            return to_json_values(value, where)
        except TypeError as exc:
            raise PayloadError(str(exc)) from None


def payload_type(tp: type[T]) -> PayloadType[T]:
    """The :class:`PayloadType` of a dataclass or a pydantic model.

    Raises:
        TypeError: ``tp`` is neither (a dataclass instance, a dict, ...).
    """
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or _is_pydantic(tp)):
        return PayloadType(tp)
    raise TypeError(f"a payload type must be a dataclass or a pydantic model class, got {tp!r}")


def _pydantic_errors(exc: Any) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error.get("loc", ())) or "(the payload)"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if isinstance(value, int | Decimal | float) else type(value).__name__
