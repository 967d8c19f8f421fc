"""The relay: outbox streams in Redis to Kafka topics.

Each release's outbox is read through the consumer group `relay`, so several relays share
the work and a dead relay's pending entries are taken over (XAUTOCLAIM). An entry is
acknowledged only after Kafka acknowledged it (acks=all) and stays in the stream until
reconcile finds its booking in PostgreSQL: the outbox is the durable copy until then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError, ResponseError

from ..core import keys, topics
from ..core.aio import run_until_signalled, wait_event
from ..core.kafka import ensure_topics, kafka_producer
from ..core.metrics import watch_event_loop
from ..core.settings import Settings, load_settings
from ..scripts.client import AnyRedis, redis_from_url

log = logging.getLogger(__name__)

READ_COUNT = 500
IDLE_SLEEP = 0.01
STREAMS_REFRESH_SECONDS = 1.0
ACTIVE_AFTER_CLOSE_MS = 7 * 24 * 3600 * 1000

TOPIC_BY_TYPE = {
    "claim.confirmed": topics.CLAIMS,
    "claim.cancelled": topics.CANCELLATIONS,
    "lottery.lost": topics.LOTTERY,
    "queue.admitted": topics.ADMISSIONS,
    "standby.skipped": topics.STANDBY,
}

OUTBOX_LENGTH = Gauge("release_outbox_length", "Entries in a release's outbox stream",
                      ["release_id"])
RELAY_LAG = Gauge("release_relay_lag_seconds",
                  "Age of the newest entry the relay just published (0 when idle)")
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


class Relay:
    def __init__(self, settings: Settings, redis: AnyRedis, producer: AIOKafkaProducer,
                 name: str | None = None) -> None:
        self._settings = settings
        self._redis = redis
        self._producer = producer
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._streams: list[str] = []
        self._grouped: set[str] = set()
        self._retry: set[str] = set()  # streams whose own pending entries must be re-sent
        self._stopping = asyncio.Event()
        self.published = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        refreshed = 0.0
        claimed = 0.0
        delay = 0.2
        while not self._stopping.is_set():
            try:
                if time.monotonic() - refreshed > STREAMS_REFRESH_SECONDS:
                    await self._refresh_streams()
                    refreshed = time.monotonic()
                entries = await self._read()
                if time.monotonic() - claimed > self._settings.relay_takeover_seconds / 3:
                    entries += await self._take_over_dead_relays()
                    claimed = time.monotonic()
                if entries:
                    await self._relay(entries)
                else:
                    RELAY_LAG.set(0)
                    await asyncio.sleep(IDLE_SLEEP)
                delay = 0.2
            except (KafkaError, RedisError, OSError, TimeoutError) as exc:
                log.warning("relay cycle failed (%s); retrying in %.1fs", exc, delay)
                await wait_event(self._stopping, delay)
                delay = min(delay * 2, 5.0)
                with contextlib.suppress(KafkaError, OSError, TimeoutError):
                    await ensure_topics(self._settings)

    async def _refresh_streams(self) -> None:
        ids = await active_release_ids(self._redis)
        self._streams = ids
        for rid in ids:
            if rid in self._grouped:
                continue
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                await self._redis.xgroup_create(keys.outbox_key(rid), keys.OUTBOX_GROUP,
                                                id="0", mkstream=True)
            self._grouped.add(rid)
        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.xlen(keys.outbox_key(rid))
        for rid, length in zip(ids, await pipe.execute() if ids else [], strict=True):
            OUTBOX_LENGTH.labels(rid).set(length)

    async def _read(self) -> list[OutboxEntry]:
        if not self._streams:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for rid in self._streams:
            # "0": this relay's own pending entries (a send failed); ">": new entries.
            start = "0" if rid in self._retry else ">"
            pipe.xreadgroup(keys.OUTBOX_GROUP, self.name, {keys.outbox_key(rid): start},
                            count=READ_COUNT)
        replies = await pipe.execute(raise_on_error=False)
        entries: list[OutboxEntry] = []
        for rid, reply in zip(self._streams, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" in str(reply):
                    self._grouped.discard(rid)  # the stream was recreated (Redis restored)
                    continue
                raise reply
            if isinstance(reply, Exception):
                raise reply
            for _stream, items in reply or []:
                got = [parse_entry(rid, eid, fields) for eid, fields in items if fields]
                entries += got
                if rid in self._retry and not got:
                    self._retry.discard(rid)
        return entries

    async def _take_over_dead_relays(self) -> list[OutboxEntry]:
        entries: list[OutboxEntry] = []
        for rid in self._streams:
            reply = await self._redis.xautoclaim(
                keys.outbox_key(rid), keys.OUTBOX_GROUP, self.name,
                min_idle_time=int(self._settings.relay_takeover_seconds * 1000), start_id="0-0",
                count=READ_COUNT)
            items = reply[1]
            got = [parse_entry(rid, eid, fields) for eid, fields in items if fields]
            if got:
                log.info("took over %d pending entries of release %s from a dead relay",
                         len(got), rid)
            entries += got
        return entries

    async def _relay(self, entries: list[OutboxEntry]) -> None:
        sent = await publish(self._producer, entries)
        acked: dict[str, list[str]] = {}
        for entry, ok in zip(entries, sent, strict=True):
            if ok:
                acked.setdefault(entry.release_id, []).append(entry.entry_id)
            else:
                self._retry.add(entry.release_id)
        if acked:
            pipe = self._redis.pipeline(transaction=False)
            for rid, ids in acked.items():
                pipe.xack(keys.outbox_key(rid), keys.OUTBOX_GROUP, *ids)
            await pipe.execute()
        count = sum(len(ids) for ids in acked.values())
        self.published += count
        RELAY_LAG.set(max(e.age_seconds for e in entries))
        if count < len(entries):
            raise KafkaError(f"{len(entries) - count} of {len(entries)} events not acknowledged")


async def run_relay(settings: Settings, stopping: asyncio.Event | None = None) -> None:
    """A relay with its own Redis client and producer (plus reconcile on a timer)."""
    from ..bookings.attendance import no_shows_forever
    from ..core.db import connect_pool
    from .reconcile import reconcile_forever

    stop = stopping or asyncio.Event()
    redis = redis_from_url(settings.redis_url)
    producer = kafka_producer(settings)
    while True:
        try:
            await ensure_topics(settings)
            await producer.start()
            break
        except (KafkaError, OSError) as exc:
            log.warning("Kafka unreachable at start (%s); retrying", exc)
            # A stop request while Kafka is down must end the process, not the retry.
            await wait_event(stop, 1.0)
            if stop.is_set():
                with contextlib.suppress(KafkaError):
                    await producer.stop()
                await redis.aclose()
                return
    relay = Relay(settings, redis, producer)
    waiter = asyncio.create_task(stop.wait())
    pool = await connect_pool(settings, max_size=2)
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(watch_event_loop()),
             asyncio.create_task(reconcile_forever(settings, redis, producer, stop)),
             asyncio.create_task(no_shows_forever(pool, redis, settings.zone,
                                                  settings.no_show_interval_seconds, stop))]
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Every loop also ends on the event: a cancellation alone can be absorbed.
        stop.set()
        relay.stop()
        for task in [waiter, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
        with contextlib.suppress(KafkaError):
            await producer.stop()
        await pool.close()
        await redis.aclose()


def cmd_relay(args: argparse.Namespace) -> int:
    from ..core.logs import configure_logging
    from ..core.metrics_server import start_metrics_server

    settings = load_settings()
    configure_logging(settings.log_level)
    start_metrics_server(settings, "relay")

    run_until_signalled(lambda stopping: run_relay(settings, stopping))
    return 0
