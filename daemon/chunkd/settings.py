"""The daemon's settings: one frozen, validated object, durations always in seconds (``_s``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["POOLER_MODES", "Dsn", "PoolerMode", "RunSettings", "parse_duration", "pooler_mode"]

# How connections reach PostgreSQL. "session": each connection is a session (direct, or a
# pooler in session mode); "transaction": a pooler that hands each transaction to any server
# connection (PgBouncer's pool_mode = transaction, Supabase's port 6543); "auto": find out.
PoolerMode = Literal["auto", "session", "transaction"]
POOLER_MODES: tuple[PoolerMode, ...] = ("auto", "session", "transaction")


class Dsn(str):
    """A PostgreSQL connection URI that also says how to use it: ``pooler`` (``--pooler``).

    A plain ``str`` is a DSN with ``pooler="auto"``; this type carries an explicit choice
    through every layer that connects, without a second argument beside each DSN.
    """

    pooler: PoolerMode

    def __new__(cls, value: str, pooler: PoolerMode = "auto") -> Dsn:
        if pooler not in POOLER_MODES:
            raise ValueError(f"--pooler must be one of {', '.join(POOLER_MODES)}, not {pooler!r}")
        dsn = super().__new__(cls, value)
        dsn.pooler = pooler
        return dsn


def pooler_mode(dsn: str) -> PoolerMode:
    """The ``--pooler`` choice carried by ``dsn`` (``"auto"`` for a plain string)."""
    return dsn.pooler if isinstance(dsn, Dsn) else "auto"


#: The longest duration any option takes: Python's timedelta.max, in whole days.
MAX_DURATION_DAYS = 999_999_999
MAX_DURATION_S = MAX_DURATION_DAYS * 86400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """``30``, ``30s``, ``500ms``, ``5m``, ``2h``, ``7d`` → seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a duration (examples: 30, 30s, 500ms, 5m, 2h, 7d)")
        seconds = float(match[1]) * _UNIT_S[match[2]]
    if seconds < 0:
        raise ValueError(f"duration {text!r} must not be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is too long (at most {MAX_DURATION_DAYS} days)")
    return seconds


#: The longest lease and retry delay ``chunkd run`` takes (seconds): a year.
MAX_DELAY_S = 365 * 86400.0


@dataclass(frozen=True)
class RunSettings:
    dsn: str
    handlers: tuple[str, ...] = ()
    concurrency: int = 10
    lease_s: float = 60.0
    reap_interval_s: float = 30.0
    poll_interval_s: float = 30.0
    chunk_timeout_s: float = 300.0
    shutdown_timeout_s: float = 30.0
    retry_base_s: float = 2.0
    retry_cap_s: float = 600.0
    # RetryLater snoozes a chunk without spending an attempt this many times; past that it counts
    # as a failed attempt (chunkd.snooze_attempt). 0 = every RetryLater spends an attempt.
    max_snoozes: int = 20
    metrics_port: int | None = None
    metrics_interval_s: float = 15.0
    # The per-job progress lines (chunkd.runtime.progress); 0 = none.
    progress_interval_s: float = 15.0
    http_headers: dict[str, str] = field(default_factory=dict)
    # Schedules: how often the database is asked for due schedules (at most; the daemon
    # sleeps until the earliest due time when that is sooner). 0 = this daemon fires none.
    schedule_interval_s: float = 5.0
    # Tests only: a file holding the schedule clock's time (ISO 8601), instead of the database's.
    schedule_clock_file: str | None = None
    # An event loop that does not run for longer is stalled: logged, and /healthz says so.
    stall_threshold_s: float = 1.0
    # Retention: seconds between two maintenance rounds (chunkd.runtime.maintenance); 0 = this
    # daemon runs none.
    maintenance_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.lease_s < 1:
            raise ValueError("--lease must be at least 1s (heartbeats run every lease/3)")
        for name in ("reap_interval_s", "poll_interval_s", "chunk_timeout_s", "metrics_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be positive")
        if self.stall_threshold_s < 0.5:
            raise ValueError("--stall-threshold must be at least 500ms (checked every 250ms)")
        if self.progress_interval_s < 0:
            raise ValueError("--progress-interval must not be negative (0 turns it off)")
        if self.maintenance_interval_s != 0 and not 0.1 <= self.maintenance_interval_s:
            raise ValueError("--maintenance-interval must be at least 100ms, or 0 to turn it off")
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("--retry-cap must not be below --retry-base")
        for name in ("lease_s", "retry_cap_s"):
            # Stored as a time from now (a lease's end, a retry's due time), which must stay a
            # time chunkd stores (before 10000-01-01: chunkd.is_storable_time).
            if getattr(self, name) > MAX_DELAY_S:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be at most 365d")
        if self.max_snoozes < 0:
            raise ValueError("--max-snoozes must not be negative (0: RetryLater spends attempts)")

    def public_dict(self) -> dict[str, object]:
        """What start-up logs: no DSN password, no header values."""
        from chunkd.redact import redact_dsn

        return {
            "dsn": redact_dsn(self.dsn),
            "pooler": pooler_mode(self.dsn),
            "handlers": list(self.handlers),
            "concurrency": self.concurrency,
            "lease_s": self.lease_s,
            "reap_interval_s": self.reap_interval_s,
            "poll_interval_s": self.poll_interval_s,
            "chunk_timeout_s": self.chunk_timeout_s,
            "shutdown_timeout_s": self.shutdown_timeout_s,
            "retry_base_s": self.retry_base_s,
            "retry_cap_s": self.retry_cap_s,
            "max_snoozes": self.max_snoozes,
            "metrics_port": self.metrics_port,
            "metrics_interval_s": self.metrics_interval_s,
            "progress_interval_s": self.progress_interval_s,
            "http_headers": sorted(self.http_headers),
            "schedule_interval_s": self.schedule_interval_s,
            "stall_threshold_s": self.stall_threshold_s,
            "maintenance_interval_s": self.maintenance_interval_s,
        }
