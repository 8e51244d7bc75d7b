"""Prometheus metrics of the data service, on a registry of its own (one per app).

``/metrics`` exposes: requests by route template, method and status; request durations; bytes
served by kind; bytes read from disk to serve them (a client that disconnects stops this
counter within about one chunk); open file streams; errors by kind; connections closed for
slow headers; and, from :class:`services.jobs.JobManager`, the progress of running jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    """The service's metric objects, registered on ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "multiface_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "multiface_http_request_duration_seconds",
            "Time from request to the last byte sent, by route template",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.02, 0.1, 0.5, 2, 10, 60, 600),
        )
        self.bytes_served = Counter(
            "multiface_bytes_served",
            "Body bytes sent, by kind (shard, meta, manifest)",
            ["kind"],
            registry=self.registry,
        )
        self.disk_bytes_read = Counter(
            "multiface_disk_bytes_read",
            "Bytes read from published files to serve them",
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "multiface_open_file_streams", "Published files open for a response", registry=self.registry
        )
        self.errors = Counter("multiface_errors", "Errors by kind", ["kind"], registry=self.registry)

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a function called at scrape time (job progress, server counters)."""

        class _Callback(Collector):
            def collect(self) -> Iterable[Metric]:
                return collect()

        self.registry.register(_Callback())


def gauge(name: str, documentation: str, labels: list[str], samples: list[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class MetricsMiddleware:
    """Pure ASGI middleware counting requests by route template (never the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.duration.labels(template).observe(time.monotonic() - started)
