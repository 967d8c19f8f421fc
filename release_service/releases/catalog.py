"""Each gateway's local view of the releases it serves.

Refreshed from Redis on a short poll (and at once on a `releases:events` message), it
answers `not_open`, `paused`, `closed` and `sold_out` without a Redis round trip and
serves the public release pages pre-encoded, so the hot shard only sees claims that can
win and no read ever queries PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core import keys
from ..core.aio import wait_event
from ..core.errors import ServiceError
from ..core.metrics import STOCK_REMAINING
from ..people.limits import BookingLimits
from ..scripts.client import AnyRedis

log = logging.getLogger(__name__)

# Releases are served until a day after they close (late lookups of the page).
KEEP_AFTER_CLOSE_MS = 24 * 3600 * 1000


@dataclass(slots=True)
class ReleaseView:
    release_id: str
    document: dict[str, Any]
    limits: BookingLimits = field(default_factory=BookingLimits)
    opens_ms: int = 0
    closes_ms: int = 0
    state: str = "scheduled"
    left: int = 0
    remaining_by_slot: dict[str, int] = field(default_factory=dict)
    page: bytes = b""  # pre-encoded GET /v1/releases/{id}
    # Per status: the refusal and its encoded problem document (claims.answers).
    refusal_answers: dict[str, tuple[ServiceError, bytes]] = field(default_factory=dict)

    def status(self, now_ms: int) -> str:
        if self.state == "closed" or now_ms >= self.closes_ms:
            return "closed"
        if now_ms < self.opens_ms:
            return "upcoming"
        if self.state == "paused":
            return "paused"
        if self.left <= 0:
            return "sold_out"
        return "open"

    def public(self, now_ms: int) -> dict[str, Any]:
        slots = [
            {**s, "remaining": self.remaining_by_slot.get(s["slot_id"], 0)}
            for s in self.document["slots"]
        ]
        return {**self.document, "status": self.status(now_ms), "remaining": self.left,
                "slots": slots}

    def visit_day(self, slot_id: str) -> str | None:
        """The slot's visit day; with no slot, the first day that still has stock."""
        for slot in self.document["slots"]:
            if slot_id == slot["slot_id"] or (
                not slot_id and self.remaining_by_slot.get(slot["slot_id"], 0) > 0
            ):
                return str(slot["visit_day"])
        return None if slot_id else str(self.document["slots"][0]["visit_day"])


class ReleaseCatalog:
    def __init__(self, redis: AnyRedis, refresh_seconds: float,
                 limits: BookingLimits | None = None) -> None:
        self._redis = redis
        self._limits = limits or BookingLimits()
        self._refresh_seconds = refresh_seconds
        self._views: dict[str, ReleaseView] = {}
        self._clock_offset_ms = 0.0
        self._list_page = b"[]"
        self._wake = asyncio.Event()
        self._closed = False

    def now_ms(self) -> int:
        """Redis time as this gateway estimates it (offset measured at every refresh)."""
        return int(time.time() * 1000 + self._clock_offset_ms)

    def release_ids(self) -> list[str]:
        return sorted(self._views, key=lambda rid: self._views[rid].opens_ms)

    def get(self, release_id: str) -> ReleaseView | None:
        return self._views.get(release_id)

    @property
    def list_page(self) -> bytes:
        return self._list_page

    def mark_sold_out(self, release_id: str) -> None:
        """The script said no stock is left anywhere: shed at once, until the next poll."""
        view = self._views.get(release_id)
        if view is not None:
            view.left = 0

    def stock_returned(self, release_id: str, slot_id: str) -> None:
        """A cancellation gave a unit back: stop shedding at once, until the next poll."""
        view = self._views.get(release_id)
        if view is not None:
            view.left += 1
            view.remaining_by_slot[slot_id] = view.remaining_by_slot.get(slot_id, 0) + 1

    def poke(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """End `run` after its current refresh."""
        self._closed = True
        self._wake.set()

    async def refresh(self) -> None:
        before = time.time() * 1000
        redis_time = await self._redis.time()
        after = time.time() * 1000
        redis_ms = redis_time[0] * 1000 + redis_time[1] / 1000
        self._clock_offset_ms = redis_ms - (before + after) / 2

        ids = [
            rid.decode() for rid in await self._redis.zrangebyscore(
                keys.RELEASE_INDEX_KEY, redis_ms - KEEP_AFTER_CLOSE_MS, "+inf")
        ]
        known = dict(self._views)
        new_ids = [rid for rid in ids if rid not in known]
        if new_ids:
            # A pipeline, not MGET: the documents live on different Cluster slots.
            pipe = self._redis.pipeline(transaction=False)
            for rid in new_ids:
                pipe.get(keys.document_key(rid))
            documents = await pipe.execute()
            for rid, doc in zip(new_ids, documents, strict=True):
                if doc is not None:
                    document = orjson.loads(doc)
                    limits = dataclasses.replace(self._limits, **document.get("limits", {}))
                    known[rid] = ReleaseView(rid, document, limits)

        pipe = self._redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(keys.meta_key(rid), "opens_ms", "closes_ms", "state", "left")
            pipe.hgetall(keys.capacity_key(rid))
            pipe.hgetall(keys.taken_key(rid))
        replies = await pipe.execute() if ids else []

        views: dict[str, ReleaseView] = {}
        now = self.now_ms()
        for i, rid in enumerate(ids):
            meta, cap, taken = replies[3 * i: 3 * i + 3]
            view = known.get(rid)
            if view is None or meta[0] is None:
                continue
            view.opens_ms, view.closes_ms = int(meta[0]), int(meta[1])
            view.state, view.left = meta[2].decode(), int(meta[3])
            view.remaining_by_slot = {
                k.decode(): int(v) - int(taken.get(k, 0)) for k, v in cap.items()
            }
            view.page = orjson.dumps(view.public(now))
            for slot_id, remaining in view.remaining_by_slot.items():
                STOCK_REMAINING.labels(rid, slot_id).set(remaining)
            views[rid] = view
        self._views = views
        listed = sorted(views.values(), key=lambda v: v.opens_ms)
        self._list_page = orjson.dumps(
            [v.public(now) for v in listed if v.status(now) != "closed"]
        )

    async def run(self) -> None:
        """Refresh until `close`; a failed refresh keeps the last view and is retried.

        Ended by a flag rather than by cancellation alone: a cancellation that lands in
        a redis-py command can be absorbed there, and the loop would then run on and hold
        up the shutdown forever."""
        while not self._closed:
            try:
                await self.refresh()
            except Exception:
                log.warning("release view refresh failed; keeping the last view", exc_info=True)
            await wait_event(self._wake, self._refresh_seconds)
            self._wake.clear()

    async def listen(self) -> None:
        """Wake the poll at once when any gateway or admin announces a change (messages
        published while Redis fails over are missed; the poll covers them)."""
        while True:
            try:
                pubsub = self._redis.pubsub()
                async with pubsub:
                    await pubsub.subscribe(keys.RELEASE_EVENTS_CHANNEL)
                    # Polled with a timeout rather than listen(): a quiet channel must not
                    # read as a dead connection (the client's socket timeout), and after a
                    # failover the same object reconnects and subscribes again.
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self.poke()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("release events subscription lost; retrying", exc_info=True)
                await asyncio.sleep(1)
