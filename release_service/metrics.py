"""Prometheus metrics shared by the processes (each process exports its own registry)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                   0.512, 1.0, 2.5)

HTTP_REQUESTS = Counter(
    "release_http_requests_total", "HTTP requests by route and status", ["route", "status"]
)
HTTP_LATENCY = Histogram(
    "release_http_request_seconds", "HTTP request latency by route", ["route"],
    buckets=LATENCY_BUCKETS,
)
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
