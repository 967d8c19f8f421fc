"""Prometheus metrics shared by the processes (each process exports its own registry)."""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                   0.512, 1.0, 2.5)


class HttpMetrics:
    """Requests by route and status, and their latency by route: counted in plain ints and
    exported by this collector when /metrics is read. prometheus_client's labelled Counter
    and Histogram take a lock and walk the buckets in Python on every call, about 6 µs of
    each request in the gateway, where a whole sold-out answer costs about 90. One event
    loop counts and exports, so no lock is needed."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._bounds = tuple(buckets)
        self._labels = [*(floatToGoString(b) for b in self._bounds), "+Inf"]
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, list[float]] = {}  # route -> count per bucket, then sum

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.count(route, status)
        counts = self._latency.get(route)
        if counts is None:
            counts = self._latency[route] = [0] * (len(self._bounds) + 2)
        counts[bisect_left(self._bounds, seconds)] += 1  # the first bucket with le >= it
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("release_http_requests",
                                       "HTTP requests by route and status",
                                       labels=["route", "status"])
        for (route, status), n in self._requests.items():
            requests.add_metric([route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily("release_http_request_seconds",
                                        "HTTP request latency by route", labels=["route"])
        for route, counts in self._latency.items():
            latency.add_metric([route], list(zip(self._labels, accumulate(counts[:-1]),
                                                 strict=True)), sum_value=counts[-1])
        yield latency


HTTP = HttpMetrics()
REGISTRY.register(HTTP)

CLAIMS = Counter(
    "release_claims_total", "Claim attempts by result code (created, replayed, sold_out...)",
    ["result"],
)


@functools.cache
def claim_result(result: str) -> Counter:
    """CLAIMS bound to one result: a label lookup per claim costs more than the count."""
    return CLAIMS.labels(result)


STOCK_REMAINING = Gauge(
    "release_stock_remaining", "Remaining stock per slot of active releases",
    ["release_id", "slot_id"],
)
EVENT_LOOP_LAG = Gauge(
    "release_event_loop_lag_seconds",
    "How late a 0.25 s timer fires: the time the event loop is blocked or saturated",
)
KAFKA_CONSUMER_LAG = Gauge(
    "release_kafka_consumer_lag", "Messages behind the partition's high watermark",
    ["group", "topic", "partition"],
)
QUEUE_LENGTH = Gauge(
    "release_queue_length", "Persons waiting in a queue-mode release's waiting room",
    ["release_id"],
)
QUEUE_ADMITTED = Counter(
    "release_queue_admitted", "Persons admitted from a waiting room", ["release_id"],
)
QUEUE_RETURNED = Counter(
    "release_queue_returned", "Admissions that expired unused (their place went on)",
    ["release_id"],
)

LOOP_LAG_INTERVAL = 0.25


async def watch_event_loop() -> None:
    """Run forever in every long-running process: lag = lateness of a periodic timer."""
    import asyncio

    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LOOP_LAG_INTERVAL)
        EVENT_LOOP_LAG.set(max(0.0, loop.time() - started - LOOP_LAG_INTERVAL))
