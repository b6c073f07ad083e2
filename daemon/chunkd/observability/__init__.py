"""What the daemon tells the outside world: structured logs (:mod:`~chunkd.observability.logs`),
Prometheus metrics (:mod:`~chunkd.observability.metrics`) and the systemd notify protocol
(:mod:`~chunkd.observability.sdnotify`)."""
