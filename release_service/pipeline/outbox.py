"""The outbox: each release's Redis stream of events, written by the scripts in the same
step as the change they report, and what publishing one of its entries to Kafka means."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from ..core import keys, topics
from ..scripts.client import AnyRedis

ACTIVE_AFTER_CLOSE_MS = 7 * 24 * 3600 * 1000

TOPIC_BY_TYPE = {
    "claim.confirmed": topics.CLAIMS,
    "claim.cancelled": topics.CANCELLATIONS,
    "lottery.lost": topics.LOTTERY,
    "queue.admitted": topics.ADMISSIONS,
    "standby.skipped": topics.STANDBY,
}

RELAYED = Counter("release_relayed_events_total", "Events published to Kafka", ["topic"])


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    release_id: str
    entry_id: str
    event_type: str
    event: bytes
    person_id: str
    request_id: str = ""

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - int(self.entry_id.split("-")[0]) / 1000)


def parse_entry(release_id: str, entry_id: bytes, fields: dict[bytes, bytes]) -> OutboxEntry:
    event = fields[b"e"]
    data = orjson.loads(event)
    return OutboxEntry(release_id, entry_id.decode(), fields[b"type"].decode(), event,
                       str(data.get("person_id", "")), str(data.get("request_id", "")))


async def publish(producer: AIOKafkaProducer, entries: Sequence[OutboxEntry]) -> list[bool]:
    """Send every entry (keyed by person: one person's events keep their order) and wait
    for Kafka's acknowledgement of each; True where acknowledged."""
    futures = []
    for entry in entries:
        topic = TOPIC_BY_TYPE.get(entry.event_type, topics.CLAIMS)
        headers = [("event_type", entry.event_type.encode()),
                   ("outbox_entry", f"{entry.release_id}/{entry.entry_id}".encode()),
                   ("request_id", entry.request_id.encode())]
        futures.append(await producer.send(topic, value=entry.event,
                                           key=entry.person_id.encode(), headers=headers))
    results = await asyncio.gather(*futures, return_exceptions=True)
    for entry, result in zip(entries, results, strict=True):
        if not isinstance(result, BaseException):
            RELAYED.labels(TOPIC_BY_TYPE.get(entry.event_type, topics.CLAIMS)).inc()
    return [not isinstance(r, BaseException) for r in results]


async def active_release_ids(redis: AnyRedis) -> list[str]:
    now_ms = time.time() * 1000
    return [r.decode() for r in await redis.zrangebyscore(
        keys.RELEASE_INDEX_KEY, now_ms - ACTIVE_AFTER_CLOSE_MS, "+inf")]
