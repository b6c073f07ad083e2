"""Prometheus collectors, in a registry of our own (several daemons can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.claimed = Counter("chunkd_chunks_claimed", "Chunks claimed", ["kind"], registry=r)
        self.completed = Counter(
            "chunkd_chunks_completed", "Chunks completed", ["kind"], registry=r
        )
        self.failed = Counter(
            "chunkd_chunks_failed", "Chunks failed for good", ["kind"], registry=r
        )
        self.retried = Counter(
            "chunkd_chunks_retried", "Chunk failures scheduled for retry", ["kind"], registry=r
        )
        self.fenced = Counter(
            "chunkd_chunks_fenced", "Outcomes rejected because the claim was lost", registry=r
        )
        self.reaped = Counter("chunkd_chunks_reaped", "Chunks returned by the reaper", registry=r)
        self.released = Counter("chunkd_chunks_released", "Chunks released at shutdown", registry=r)
        self.handler_seconds = Histogram(
            "chunkd_handler_duration_seconds",
            "Handler run time",
            ["kind"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.in_flight = Gauge("chunkd_chunks_in_flight", "Handlers running now", registry=r)
        self.queue_depth = Gauge(
            "chunkd_queue_depth", "Chunks by status (sampled)", ["status"], registry=r
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
