"""Kafka clients with the service's settings: plain Kafka, the same against Apache Kafka."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
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
