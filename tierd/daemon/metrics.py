"""Prometheus metrics of the daemon, served on a loopback port by prometheus-client.

Tier gauges and counters are read from the engine at scrape time (a custom
collector), so the hot path only records op latencies and queue depths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tierd.types import Stats

__all__ = ["Metrics"]

log = logging.getLogger("tierd.daemon.metrics")

_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 0.5, 2.5, 10.0)


class _TierCollector(Collector):
    def __init__(self, stats: Callable[[], Stats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        gauges: dict[str, GaugeMetricFamily] = {
            "capacity_bytes": GaugeMetricFamily("tierd_tier_capacity_bytes", "bytes the tier may hold", labels=["tier"]),
            "used_bytes": GaugeMetricFamily("tierd_tier_used_bytes", "bytes in allocated extents", labels=["tier"]),
            "objects": GaugeMetricFamily("tierd_tier_objects", "objects with a copy on the tier", labels=["tier"]),
            "fragmentation": GaugeMetricFamily("tierd_tier_fragmentation", "1 - largest free / free", labels=["tier"]),
        }
        counters: dict[str, CounterMetricFamily] = {
            "hits": CounterMetricFamily("tierd_tier_hits", "gets served from the tier", labels=["tier"]),
            "misses": CounterMetricFamily("tierd_tier_misses", "gets not found on the tier", labels=["tier"]),
            "bytes_in": CounterMetricFamily("tierd_tier_in_bytes", "bytes written to the tier", labels=["tier"]),
            "bytes_out": CounterMetricFamily("tierd_tier_out_bytes", "bytes read from the tier", labels=["tier"]),
            "promoted_bytes": CounterMetricFamily("tierd_tier_promoted_bytes", "bytes promoted into the tier", labels=["tier"]),
            "demoted_bytes": CounterMetricFamily("tierd_tier_demoted_bytes", "bytes demoted into the tier", labels=["tier"]),
            "evicted": CounterMetricFamily("tierd_tier_evicted", "cache objects dropped from the tier for room",
                                           labels=["tier"]),
            "evicted_bytes": CounterMetricFamily("tierd_tier_evicted_bytes", "bytes of cache objects dropped",
                                                 labels=["tier"]),
        }
        for name, t in stats.tiers.items():
            for field, gauge in gauges.items():
                gauge.add_metric([name], float(getattr(t, field)))
            for field, counter in counters.items():
                counter.add_metric([name], float(getattr(t, field)))
        yield from gauges.values()
        yield from counters.values()


class Metrics:
    """The daemon's metrics; ``start()`` serves them over HTTP on ``address`` ("host:port")."""

    def __init__(self, stats: Callable[[], Stats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_TierCollector(stats))
        self.op_seconds = Histogram("tierd_op_seconds", "request latency in the daemon", ["op"],
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inflight = Gauge("tierd_requests_in_flight", "requests being served (queue depth)",
                              registry=self.registry)
        self.clients = Gauge("tierd_clients", "connected clients", registry=self.registry)
        self.port: int | None = None
        self._server: Any = None
        self._op_children: dict[str, Any] = {}

    def observe(self, op: str, seconds: float) -> None:
        """Record one request's latency (the labelled child is cached: this is on every request)."""
        child = self._op_children.get(op)
        if child is None:
            child = self._op_children[op] = self.op_seconds.labels(op)
        child.observe(seconds)

    def start(self, address: str) -> None:
        if not address:
            return
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._server = server
        self.port = server.server_port
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
