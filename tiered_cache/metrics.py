"""Prometheus metrics (the optional extra ``tiered_cache[prometheus]``).

A collector reads the counters tiered_cache keeps anyway at scrape time, so reads pay
nothing for metrics. Serve them with ``path("metrics", tiered_cache.metrics.metrics_view)``
or register ``TieredCacheCollector()`` on a registry of your own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .breaker import CLOSED, HALF_OPEN, OPEN, breaker
from .bus import bus
from .reporting import cluster_stats, publish_stats, publisher, stats
from .tiers.remote import Unavailable, redis_tier

__all__ = ["TieredCacheCollector", "metrics_view", "register"]


class TieredCacheCollector:
    """This process's hits and misses by model and tier, invalidations, fills, L1 size,
    L2 latency, breaker and bus state; with ``cluster=True`` also the counters all
    processes pushed to Redis (skipped while Redis is unavailable)."""

    def __init__(self, cluster: bool = True) -> None:
        self.cluster = cluster

    def describe(self) -> list[Metric]:
        # Names only: registering must not touch Redis.
        return list(self._families(with_samples=False))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_samples=True)

    def _families(self, with_samples: bool) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "tiered_cache_hits",
            "Reads served from a cache tier (this process).",
            labels=["model", "tier"],
        )
        negative = CounterMetricFamily(
            "tiered_cache_negative_hits",
            "Reads answered by a remembered absence.",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "tiered_cache_misses", "Reads that went to the database.", labels=["model"]
        )
        invalidations = CounterMetricFamily(
            "tiered_cache_invalidations",
            "Rows or models invalidated by this process.",
            labels=["model"],
        )
        fills = CounterMetricFamily(
            "tiered_cache_fills",
            "L2 fills, stored or refused (a write won the race).",
            labels=["model", "result"],
        )
        corrupt = CounterMetricFamily(
            "tiered_cache_corrupt_payloads",
            "L2 payloads that failed authentication.",
            labels=["model"],
        )
        l1 = GaugeMetricFamily(
            "tiered_cache_l1_entries", "Entries in this process's L1.", labels=["model"]
        )
        state = GaugeMetricFamily(
            "tiered_cache_breaker_state",
            "Circuit breaker state around Redis (1 = current).",
            labels=["state"],
        )
        opened = CounterMetricFamily(
            "tiered_cache_breaker_opened", "Times the circuit breaker opened."
        )
        trusted = GaugeMetricFamily(
            "tiered_cache_bus_trusted", "1 while the invalidation bus is live (L1 trusted)."
        )
        heartbeat = GaugeMetricFamily(
            "tiered_cache_bus_heartbeat_seconds", "Last bus heartbeat round trip to Redis."
        )
        latency = HistogramMetricFamily(
            "tiered_cache_l2_latency_seconds",
            "Round trips of batched L2 calls (stats pushes).",
            buckets=self._buckets() if with_samples else None,
            sum_value=redis_tier.latency.sum if with_samples else None,
        )
        families: list[Metric] = [
            hits,
            negative,
            misses,
            invalidations,
            fills,
            corrupt,
            l1,
            state,
            opened,
            trusted,
            heartbeat,
            latency,
        ]
        cluster_hits = CounterMetricFamily(
            "tiered_cache_cluster_hits",
            "Reads served from a cache tier, all processes.",
            labels=["model", "tier"],
        )
        cluster_misses = CounterMetricFamily(
            "tiered_cache_cluster_misses",
            "Reads that went to the database, all processes.",
            labels=["model"],
        )
        if self.cluster:
            families += [cluster_hits, cluster_misses]
        if not with_samples:
            yield from families
            return

        for label, row in stats().items():
            hits.add_metric([label, "l1"], row["l1_hits"])
            hits.add_metric([label, "l2"], row["l2_hits"])
            negative.add_metric([label], row["negative_hits"])
            misses.add_metric([label], row["misses"])
            invalidations.add_metric([label], row["invalidations"])
            fills.add_metric([label, "stored"], row["fills"])
            fills.add_metric([label, "refused"], row["fills_refused"])
            corrupt.add_metric([label], row["corrupt"])
            l1.add_metric([label], row["l1_entries"])
        for s in (CLOSED, OPEN, HALF_OPEN):
            state.add_metric([s], 1.0 if breaker.state == s else 0.0)
        opened.add_metric([], breaker.opened_count)
        trusted.add_metric([], 1.0 if bus.trusted() else 0.0)
        if bus.last_latency is not None:
            heartbeat.add_metric([], bus.last_latency)
        if self.cluster:
            try:
                publish_stats()
                for label, row in cluster_stats().items():
                    cluster_hits.add_metric([label, "l1"], row["l1_hits"])
                    cluster_hits.add_metric([label, "l2"], row["l2_hits"])
                    cluster_misses.add_metric([label], row["misses"])
            except Unavailable:
                families.remove(cluster_hits)
                families.remove(cluster_misses)
        yield from families

    @staticmethod
    def _buckets() -> list[tuple[str, float]]:
        h = redis_tier.latency
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(h.BUCKETS, h.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", h.count))
        return out


_registered: set[int] = set()
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def register(registry: CollectorRegistry = REGISTRY, cluster: bool = True) -> None:
    """Register the collector once per registry, and start pushing this process's stats."""
    publisher.start()
    with _lock:
        if id(registry) in _registered:
            return
        registry.register(TieredCacheCollector(cluster=cluster))
        _registered.add(id(registry))


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of the default registry (with tiered_cache's metrics)."""
    register()
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
