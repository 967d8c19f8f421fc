"""The shared Kafka loop for every consumer: fetch a batch, decode each message with the
consumer's pure `decode`, dead-letter what cannot be decoded, hand the rest to `handle`,
and commit offsets only after `handle` returned (its database commit is done).

At-least-once: a crash between the database commit and the offset commit replays the
batch, and every `handle` is idempotent. A failing `handle` (database down) is retried
with backoff on the same batch; offsets never move past unfinished work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from release_service.core.aio import wait_event
from release_service.core.kafka import kafka_producer
from release_service.core.metrics import KAFKA_CONSUMER_LAG, watch_event_loop
from release_service.core.settings import Settings

log = logging.getLogger("consumers.runner")

E = TypeVar("E")

MAX_BATCH = 1000
FETCH_TIMEOUT_MS = 200


class InvalidMessage(ValueError):
    """The message can never be processed (undecodable, fails validation): dead-letter it."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    index: int  # position in the batch handed to `handle`
    reason: str


class Processor(Protocol, Generic[E]):  # type: ignore[misc]
    group_id: str
    topics: tuple[str, ...]
    dead_letter_topic: str

    def decode(self, record: ConsumerRecord[bytes, bytes]) -> E:
        """Pure: bytes to a validated event, or InvalidMessage."""
        ...

    async def handle(self, events: Sequence[E]) -> Sequence[DeadLetter]:
        """Apply a batch idempotently; return the events to dead-letter (given up on)."""
        ...


def dead_letter_headers(
    record: ConsumerRecord[bytes, bytes], reason: str
) -> list[tuple[str, bytes]]:
    return [
        ("reason", reason[:500].encode()),
        ("source_topic", record.topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
    ]


class ConsumerRunner(Generic[E]):
    def __init__(self, settings: Settings, processor: Processor[E]) -> None:
        self._settings = settings
        self._processor = processor
        self._stopping = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        p = self._processor
        consumer = AIOKafkaConsumer(
            *p.topics,
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=p.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_BATCH,
            metadata_max_age_ms=5_000,
        )
        producer = kafka_producer(self._settings)
        if not await _start_with_retry(consumer, "consumer", self._stopping):
            return
        try:
            if not await _start_with_retry(producer, "dead-letter producer", self._stopping):
                return
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=MAX_BATCH)
                records = [r for part in batch.values() for r in part]
                if not records:
                    continue
                if not await self._process(records, producer):
                    return  # stopping: offsets stay where the finished work ends
                await self._commit(consumer)
                self._record_lag(consumer, batch)
        finally:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            with contextlib.suppress(KafkaError):
                await consumer.stop()

    async def _process(
        self, records: list[ConsumerRecord[bytes, bytes]], producer: AIOKafkaProducer
    ) -> bool:
        p = self._processor
        good: list[tuple[ConsumerRecord[bytes, bytes], E]] = []
        dead: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
        for record in records:
            try:
                good.append((record, p.decode(record)))
            except InvalidMessage as exc:
                dead.append((record, f"invalid: {exc}"))

        delay = 0.1
        while True:
            try:
                given_up = await p.handle([event for _, event in good]) if good else []
                break
            except Exception:
                log.warning("%s: batch of %d failed; retrying in %.1fs", p.group_id,
                            len(good), delay, exc_info=True)
                await wait_event(self._stopping, delay)
                if self._stopping.is_set():
                    return False
                delay = min(delay * 2, 5.0) * random.uniform(0.8, 1.2)
        dead += [(good[d.index][0], d.reason) for d in given_up]

        for record, reason in dead:
            while True:
                try:
                    await producer.send_and_wait(
                        p.dead_letter_topic, value=record.value, key=record.key,
                        headers=dead_letter_headers(record, reason))
                    break
                except KafkaError:
                    log.warning("%s: dead-letter topic unavailable; retrying", p.group_id)
                    await asyncio.sleep(1)
                    if self._stopping.is_set():
                        return False
            log.warning("%s: message %s/%d@%d dead-lettered: %s", p.group_id, record.topic,
                        record.partition, record.offset, reason,
                        extra={"request_id": request_id_of(record)})
        self.processed += len(good)
        self.dead_lettered += len(dead)
        return True

    def _record_lag(self, consumer: AIOKafkaConsumer, batch: dict[Any, Any]) -> None:
        for tp, records in batch.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                KAFKA_CONSUMER_LAG.labels(self._processor.group_id, tp.topic,
                                          str(tp.partition)).set(
                    max(0, highwater - records[-1].offset - 1))

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        try:
            await consumer.commit()
        except KafkaError:
            # A rebalance or a broker restart: the batch is replayed, which is harmless.
            log.warning("%s: offset commit failed; the batch may be replayed",
                        self._processor.group_id, exc_info=True)


async def _start_with_retry(client: Any, what: str, stopping: asyncio.Event) -> bool:
    """Start, retrying while Kafka is unreachable; False when asked to stop meanwhile."""
    delay = 0.2
    while not stopping.is_set():
        try:
            await client.start()
            return True
        except KafkaError:
            log.warning("Kafka unreachable for the %s; retrying in %.1fs", what, delay)
            await wait_event(stopping, delay)
            delay = min(delay * 2, 5.0)
    return False


async def run_until(runner: ConsumerRunner[Any], stopping: asyncio.Event) -> None:
    """Run until `stopping` is set; the batch in hand is finished and committed first."""
    task = asyncio.create_task(runner.run())
    waiter = asyncio.create_task(stopping.wait())
    watcher = asyncio.create_task(watch_event_loop())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    runner.stop()
    waiter.cancel()
    watcher.cancel()
    await task


def request_id_of(record: ConsumerRecord[bytes, bytes]) -> str:
    """The gateway's request id, carried in the Kafka headers from the claim."""
    for name, value in record.headers or ():
        if name == "request_id":
            return value.decode(errors="replace")
    return ""


def json_object(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    """Decode a record's value as a JSON object, or InvalidMessage."""
    try:
        data = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage("not a JSON object")
    return data
