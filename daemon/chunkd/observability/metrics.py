"""Prometheus collectors, in a registry of our own (several daemons can share a process).

Names follow the Prometheus conventions: counters are exposed with a ``_total`` suffix
(``chunkd_chunks_claimed_total``), durations are in seconds, and a gauge says what it is a
snapshot of. ``kind`` labels are bounded by the handlers a daemon loads, so they cannot
explode in cardinality; job and chunk ids are never labels (they belong in the logs).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from chunkd.errors import ChunkdError
from chunkd.observability.probes import PATHS, Probes, StartResponse, WsgiApp

__all__ = ["HANDLER_BUCKETS_S", "Metrics"]

# From 1 ms (an in-process handler) to 5 min (the default --chunk-timeout).
HANDLER_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Every collector the daemon updates; the counting happens where the event happens
    (claimer, worker, reaper, supervisor), this class only names and describes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claimed = Counter(
            "chunkd_chunks_claimed",
            "Chunks claimed by this process (one per attempt)",
            ["kind"],
            registry=r,
        )
        self.completed = Counter(
            "chunkd_chunks_completed",
            "Chunks whose handler succeeded and whose result was recorded",
            ["kind"],
            registry=r,
        )
        self.failed = Counter(
            "chunkd_chunks_failed",
            "Chunks failed for good (permanent error or attempts exhausted)",
            ["kind"],
            registry=r,
        )
        self.retried = Counter(
            "chunkd_chunks_retried",
            "Chunk attempts that failed and were scheduled to run again",
            ["kind"],
            registry=r,
        )
        self.snoozed = Counter(
            "chunkd_chunks_snoozed",
            "Chunks a handler's RetryLater put back for a while without spending an attempt",
            ["kind"],
            registry=r,
        )
        self.fenced = Counter(
            "chunkd_chunks_fenced",
            "Outcomes rejected because the chunk's lease had been lost to another worker",
            registry=r,
        )
        self.reaped = Counter(
            "chunkd_chunks_reaped",
            "Chunks with expired leases recovered by this process's reaper (requeued, or failed "
            "when out of attempts)",
            registry=r,
        )
        self.released = Counter(
            "chunkd_chunks_released",
            "Unfinished chunks released at shutdown without spending an attempt",
            registry=r,
        )
        self.handler_seconds = Histogram(
            "chunkd_handler_duration_seconds",
            "Handler run time per attempt, whatever its outcome",
            ["kind"],
            buckets=HANDLER_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "chunkd_chunks_in_flight",
            "Chunks claimed by this process whose handler is running",
            registry=r,
        )
        self.queue_depth = Gauge(
            "chunkd_queue_depth",
            "Chunks in the whole queue (all kinds, all workers) by status: pending (due now), "
            "scheduled (waiting for run_at), processing; sampled every 15 s by default",
            ["status"],
            registry=r,
        )

    def serve(self, port: int, addr: str = "0.0.0.0", *, probes: Probes | None = None) -> None:
        """Serves ``/metrics`` (also on ``/``) and, given ``probes``, ``/healthz`` and
        ``/readyz`` (``404`` for any other path) from a daemon thread, so a busy event loop
        never delays a scrape or a probe, and a blocked one is reported as such rather than by
        a timeout. Raises ChunkdError when the port cannot be had (taken, or a privileged
        one)."""
        exposition = make_wsgi_app(self.registry)
        routes = {"/": exposition, "/metrics": exposition}
        if probes is not None:
            routes.update(dict.fromkeys(PATHS, probes.wsgi()))
        app = _routed(routes)
        # As prometheus_client.start_wsgi_server does: the address family the address needs.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        host = str(sockaddr[0])
        try:
            server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ChunkdError(
                f"cannot serve metrics on {addr}:{port} (--metrics-port): {exc.strerror or exc}"
            ) from None
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


def _routed(routes: dict[str, WsgiApp]) -> WsgiApp:
    """``routes`` by exact path, ``404`` for any other. prometheus-client's own app serves
    every path (for backwards compatibility), so a mistyped probe path (``/healthz/``) would
    pass with the metrics text."""
    known = ", ".join(p for p in routes if p != "/").encode()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = routes.get(environ.get("PATH_INFO", ""))
        if route is not None:
            return route(environ, start_response)
        body = b"404 not found: this port serves " + known + b"\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: probes every few seconds would flood the journal."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
