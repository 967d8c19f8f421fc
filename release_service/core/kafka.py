"""Kafka clients with the service's settings: plain Kafka, the same against Apache Kafka."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from . import topics
from .settings import Settings

log = logging.getLogger(__name__)


def kafka_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all everywhere; idempotence is a setting (Tansu rejects it, Kafka wants it on)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "linger_ms": 2,
        "request_timeout_ms": 10_000,
        "metadata_max_age_ms": 5_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def ensure_topics(settings: Settings) -> None:
    """Create the service's topics when missing (a memory-only broker forgets them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=5_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, settings.kafka_partitions, settings.kafka_replication_factor)
            for name in topics.ALL if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created Kafka topics %s", [t.name for t in missing])
    finally:
        with contextlib.suppress(KafkaError):
            await admin.close()


async def unread(settings: Settings, group_id: str, topic: str) -> int:
    """Events of `topic` that consumer group has not committed yet: its backlog. Where it
    never committed, from the earliest event on (where our consumers start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                enable_auto_commit=False, request_timeout_ms=10_000)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=10_000)
    try:
        await consumer.start()
        await admin.start()
        await consumer.topics()  # the cluster's metadata, this topic's partitions with it
        partitions = [TopicPartition(topic, p)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return 0
        end = await consumer.end_offsets(partitions)
        first = await consumer.beginning_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        # A committed offset past the end: the broker lost the topic (memory only).
        return sum(max(0, end[tp] - (committed[tp].offset if tp in committed
                                     and committed[tp].offset >= 0 else first[tp]))
                   for tp in partitions)
    finally:
        with contextlib.suppress(KafkaError):
            await admin.close()
        with contextlib.suppress(KafkaError):
            await consumer.stop()
