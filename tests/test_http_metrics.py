"""The gateway's request metrics: counted in plain ints, exported exactly as
prometheus_client's own Counter and Histogram would export the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from release_service.core.metrics import LATENCY_BUCKETS, HttpMetrics

REQUESTS = [("claims", 201, 0.0004), ("claims", 201, 0.001), ("claims", 409, 0.0031),
            ("claims", 201, 0.25), ("release", 200, 3.0), ("claims", 503, 0.001)]


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def test_requests_and_latency_export_as_prometheus_clients_own_metrics() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics = HttpMetrics()
    ours.register(metrics)
    counter = Counter("release_http_requests", "HTTP requests by route and status",
                      ["route", "status"], registry=theirs)
    histogram = Histogram("release_http_request_seconds", "HTTP request latency by route",
                          ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    for route, status, seconds in REQUESTS:
        metrics.observe(route, status, seconds)
        counter.labels(route, str(status)).inc()
        histogram.labels(route).observe(seconds)
    metrics.count("overloaded", 503)  # shed before any work: counted, not timed
    counter.labels("overloaded", "503").inc()

    assert samples(ours) == samples(theirs)
    assert ("release_http_request_seconds_bucket", (("le", "0.001"), ("route", "claims")),
            3.0) in samples(ours)  # an observation on a bound counts in that bucket
