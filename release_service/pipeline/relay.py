"""The relay: outbox streams in Redis to Kafka topics.

Each release's outbox is read through the consumer group `relay`, so several relays share
the work and a dead relay's pending entries are taken over (XAUTOCLAIM). An entry is
acknowledged only after Kafka acknowledged it (acks=all) and stays in the stream until
reconcile finds its booking in PostgreSQL: the outbox is the durable copy until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Gauge
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from ..core import keys
from ..core.aio import wait_event
from ..core.kafka import ensure_topics
from ..core.settings import Settings
from ..scripts.client import AnyRedis, follow_primary
from .outbox import OutboxEntry, active_release_ids, parse_entry, publish

log = logging.getLogger(__name__)

READ_COUNT = 500
IDLE_SLEEP = 0.01
STREAMS_REFRESH_SECONDS = 1.0

OUTBOX_LENGTH = Gauge("release_outbox_length", "Entries in a release's outbox stream",
                      ["release_id"])
RELAY_LAG = Gauge("release_relay_lag_seconds",
                  "Age of the newest entry the relay just published (0 when idle)")


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
        replicated = self._replicas_confirm(pipe)
        replies = await pipe.execute(raise_on_error=False)
        if replicated:
            acknowledged = replies.pop()
            replies.pop()  # the heartbeat
            if not isinstance(acknowledged, int) or acknowledged < replicated:
                # What was read may exist only on this primary (a write answered 503, or
                # a primary cut off from the rest): published, it could become a booking
                # the promoted replica never had. Read again once the replicas have it.
                log.warning("outbox entries not yet on %d replica(s) (%s); not published",
                            replicated, acknowledged)
                self._retry.update(self._streams)
                await follow_primary(self._redis)
                return []
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

    def _replicas_confirm(self, pipe: Any) -> int:
        """With `redis_min_replicas` = k on one primary: a write of this connection and
        WAIT k end the read's pipeline, so the entries read are published only once k
        replicas have everything up to them (WAIT counts the replicas that have this
        connection's last write, and the replication stream is ordered). Returns k, or 0
        where it does not apply (k = 0; on Redis Cluster each shard has its own stream)."""
        k = self._settings.redis_min_replicas
        if not k or isinstance(self._redis, RedisCluster):
            return 0
        pipe.set(keys.relay_heartbeat_key(self.name), int(time.time() * 1000), px=60_000)
        pipe.execute_command("WAIT", k, self._settings.redis_replica_timeout_ms)
        return k

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
