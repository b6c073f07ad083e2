"""``/healthz`` and ``/readyz`` on the metrics port: is this daemon alive, and is it ready?

The answers are computed in the HTTP server's thread from what the event loop last wrote here,
never on the loop itself: a blocked loop cannot answer, so it could not say that it is
blocked. The loop writes three things:

- a tick every :data:`chunkd.runtime.stall.TICK_S` (:meth:`Probes.tick`): ``/healthz`` is
  unhealthy while the last tick is older than the stall threshold;
- the state of each supervised task (:meth:`Probes.task_state`): one that ended while the
  daemon is not stopping makes ``/healthz`` unhealthy;
- the result of each round of readiness checks (:meth:`Probes.readiness`, from
  :mod:`chunkd.runtime.readiness`): the database answers, the schema is current, the listener
  is connected or the poll fallback is active. A result older than ``stale_after_s`` counts as
  not ready (the loop that should refresh it is stuck).

Both answer ``200`` or ``503`` with a JSON body, to ``GET`` and ``HEAD``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PATHS", "Phase", "Probes", "StartResponse", "TaskState", "WsgiApp"]

#: The paths :meth:`Probes.wsgi` answers.
PATHS = ("/healthz", "/readyz")

Phase = Literal["starting", "running", "stopping"]
TaskState = Literal["running", "restarting", "ended"]
# WSGI's types, spelled out (wsgiref.types exists from Python 3.11 only as a stub module).
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_STATUS_LINE = {200: "200 OK", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


@dataclass(frozen=True)
class _Round:
    checks: dict[str, dict[str, Any]]
    at: float  # clock() when the round finished


class Probes:
    """The state the event loop publishes and the probe endpoints read (thread-safe).

    ``stall_threshold_s``: how long without a tick counts as a stalled loop (``--stall-
    threshold``). ``stale_after_s``: how old a round of readiness checks may be before it no
    longer counts. ``clock``: monotonic seconds (``time.monotonic``; tests pass their own).
    """

    def __init__(
        self,
        *,
        stall_threshold_s: float,
        stale_after_s: float,
        worker_id: str = "",
        version: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_threshold_s = stall_threshold_s
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._identity = {"worker_id": worker_id, "version": version}
        self._last_tick = clock()
        self._tasks: dict[str, TaskState] = {}
        self._crashes: dict[str, int] = {}
        self._phase: Phase = "starting"
        self._round: _Round | None = None

    # --- written by the event loop ------------------------------------------------------------

    def tick(self) -> None:
        """The event loop ran: called every tick by the stall detector."""
        now = self._clock()
        with self._lock:
            self._last_tick = now

    def identify(self, worker_id: str, version: str) -> None:
        with self._lock:
            self._identity = {"worker_id": worker_id, "version": version}

    def set_phase(self, phase: Phase) -> None:
        with self._lock:
            self._phase = phase

    def task_state(self, name: str, state: TaskState) -> None:
        """A supervised task started (again), crashed and waits to restart, or ended."""
        with self._lock:
            self._tasks[name] = state
            if state == "restarting":
                self._crashes[name] = self._crashes.get(name, 0) + 1

    def readiness(self, checks: dict[str, dict[str, Any]]) -> None:
        """One round of readiness checks: each has ``ok`` (bool) and what it found."""
        with self._lock:
            self._round = _Round(checks=checks, at=self._clock())

    # --- read by the HTTP thread --------------------------------------------------------------

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, body)``: 503 while the loop is stalled past the threshold, or when a
        supervised task ended outside a stop."""
        with self._lock:
            now = self._clock()
            since_tick_s = now - self._last_tick
            stalled = since_tick_s > self.stall_threshold_s
            ended = [n for n, s in self._tasks.items() if s == "ended"]
            dead = ended if self._phase != "stopping" else []
            problems = []
            if stalled:
                problems.append(
                    f"the event loop has not run for {since_tick_s:.1f} s (threshold "
                    f"{self.stall_threshold_s:g} s): blocking code in an async handler?"
                )
            if dead:
                problems.append(f"task(s) ended: {', '.join(sorted(dead))}")
            body = {
                "status": "unhealthy" if problems else "ok",
                "problems": problems,
                "phase": self._phase,
                "event_loop": {
                    "stalled": stalled,
                    "since_last_tick_s": round(since_tick_s, 3),
                    "stall_threshold_s": self.stall_threshold_s,
                },
                "tasks": {
                    name: {"state": state, "crashes": self._crashes.get(name, 0)}
                    for name, state in sorted(self._tasks.items())
                },
                **self._identity,
            }
        return (503 if problems else 200), body

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, body)``: 200 only while running, with a fresh round of checks that
        all passed."""
        with self._lock:
            now = self._clock()
            phase, result = self._phase, self._round
            problems: list[str] = []
            checks: dict[str, dict[str, Any]] = {}
            age_s: float | None = None
            if phase != "running":
                problems.append(
                    "starting: not connected and listening yet"
                    if phase == "starting"
                    else "stopping: no new work is claimed"
                )
            elif result is None:
                problems.append("the first readiness checks have not finished yet")
            else:
                checks = result.checks
                age_s = now - result.at
                if age_s > self.stale_after_s:
                    problems.append(
                        f"the last readiness checks ran {age_s:.1f} s ago: the event loop is "
                        "stalled or the database does not answer"
                    )
                problems += [
                    f"{name}: {check.get('error') or 'failed'}"
                    for name, check in checks.items()
                    if not check.get("ok")
                ]
            body = {
                "status": "not_ready" if problems else "ready",
                "problems": problems,
                "phase": phase,
                "checks": checks,
                "checked_s_ago": None if age_s is None else round(age_s, 3),
                **self._identity,
            }
        return (503 if problems else 200), body

    def wsgi(self) -> WsgiApp:
        """A WSGI app answering ``/healthz`` and ``/readyz`` (the metrics server routes only
        those two paths here: :meth:`chunkd.observability.metrics.Metrics.serve`)."""

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            method = environ.get("REQUEST_METHOD", "GET")
            if method not in ("GET", "HEAD"):
                start_response(_STATUS_LINE[405], [("Allow", "GET, HEAD")])
                return [b""]
            code, body = self.healthz() if path == "/healthz" else self.readyz()
            data = json.dumps(body).encode()
            start_response(
                _STATUS_LINE[code],
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(data))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [b"" if method == "HEAD" else data]

        return app
