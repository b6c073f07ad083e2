"""Cron expressions in a time zone: the next due time after a given instant.

Parsing and stepping are cronsim's (a maintained, dependency-free cron evaluator that follows
Debian cron, including across DST). Times are evaluated in the schedule's IANA time zone, so
``0 2 * * *`` in ``Europe/Berlin`` is 02:00 Berlin time in winter and in summer. On the spring
change, a time in the skipped hour fires once right after the change (03:00); on the autumn
change, a fixed time in the repeated hour fires once (the first 02:30), while an expression
stepping through minutes or hours (``*/15 * * * *``) fires at each real instant, so no fire is
skipped or doubled.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

__all__ = ["next_fire", "zone"]


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{name!r} is not a time zone name (e.g. UTC, Europe/Berlin)") from exc


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first due time of ``cron`` in ``timezone`` strictly after ``after`` (an aware
    datetime), in UTC. ValueError for an expression cronsim cannot read, an unknown zone, or
    an expression that never fires."""
    if after.tzinfo is None:
        raise ValueError("after must be an aware datetime")
    tz = zone(timezone)
    try:
        it = CronSim(cron.strip(), after.astimezone(tz))
        due = next(it)
        if due.tzinfo is None:  # cronsim returns aware times for aware input; never trust it
            due = due.replace(tzinfo=tz)
        return due.astimezone(UTC)
    except CronSimError as exc:
        raise ValueError(f"{cron!r} is not a cron expression: {exc}") from None
    except StopIteration:
        raise ValueError(f"{cron!r} never fires") from None
    except OverflowError:  # stepped (or converted) past 9999-12-31
        raise ValueError(f"{cron!r} never fires before 10000-01-01") from None
