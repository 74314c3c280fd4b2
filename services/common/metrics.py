"""Prometheus metrics shared by the services."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("nanodist_requests_total", "RPCs handled", ["service", "method", "code"])
LATENCY = Histogram(
    "nanodist_request_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
BYTES = Counter("nanodist_bytes_total", "Tensor payload bytes", ["service", "direction"])
KEYS = Gauge("nanodist_ps_keys", "Keys held by this parameter-server shard")
KEY_BYTES = Gauge("nanodist_ps_key_bytes", "Bytes of values held by this shard")


class CallMetrics:
    """Counts and times the calls of one RPC method, by final status code."""

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        # Label lookups cost microseconds; resolve the common ones once.
        self._latency = LATENCY.labels(service, method)
        self._ok = REQUESTS.labels(service, method, "OK")

    def record(self, code: str, seconds: float) -> None:
        """One finished call; `code` is the name of its gRPC status code ("OK", "INVALID_ARGUMENT", ...)."""
        if code == "OK":
            self._ok.inc()
        else:
            REQUESTS.labels(self.service, self.method, code).inc()
        self._latency.observe(seconds)
