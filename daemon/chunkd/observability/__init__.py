"""What the daemon tells the outside world: structured logs (:mod:`~chunkd.observability.logs`),
Prometheus metrics (:mod:`~chunkd.observability.metrics`), the systemd notify protocol
(:mod:`~chunkd.observability.sdnotify`) and OpenTelemetry tracing, optional
(:mod:`~chunkd.observability.tracing`)."""
