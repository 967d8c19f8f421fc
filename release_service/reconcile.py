"""Reconcile: compare Redis (outbox, claims) with PostgreSQL (bookings, SMS rows) and repair.

- An outbox entry whose effect is in PostgreSQL is trimmed: the outbox is no longer the
  only copy.
- An outbox entry acknowledged by Kafka but still not in PostgreSQL after the grace
  period is published again (the broker lost it, or a consumer skipped it).
- A booking without its confirmation SMS (or with one stuck half-sent) after the grace
  period has its claim event published again: the SMS consumer sends what is missing.
- With `full`, every claim in Redis is checked for a booking, also those no longer in the
  outbox.

Everything it does is idempotent, so it is safe from several processes at once and a
no-op when all is well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from tqdm import tqdm

from . import keys
from .db import connect_pool
from .kafka import kafka_producer
from .redis_client import AnyRedis, redis_from_url
from .relay import OutboxEntry, active_release_ids, parse_entry, publish
from .settings import Settings, load_settings

log = logging.getLogger(__name__)

PAGE = 1000
INTERVAL_SECONDS = 5.0
SMS_KIND_CONFIRMATION = "confirmation"


@dataclass
class ReconcileReport:
    releases: int = 0
    outbox_entries: int = 0
    trimmed: int = 0
    republished: int = 0
    missing_sms: int = 0
    missing_bookings: int = 0
    stale_reservations: int = 0

    def add(self, other: ReconcileReport) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def repaired(self) -> int:
        return self.republished

    def lines(self) -> list[str]:
        return [f"{name.replace('_', ' ')}: {value}" for name, value in asdict(self).items()]


def claim_event(row: asyncpg.Record | dict[str, object]) -> bytes:
    """A claim event rebuilt from a booking row (same shape as the claim script's)."""
    claimed_at = row["claimed_at"]
    return orjson.dumps({
        "claim_id": row["claim_id"], "code": row["code"].strip(),  # type: ignore[union-attr]
        "release_id": row["release_id"], "slot_id": row["slot_id"],
        "person_id": row["person_id"], "account_id": row["account_id"],
        "status": "confirmed",
        "claimed_at_ms": int(claimed_at.timestamp() * 1000),  # type: ignore[union-attr]
    })


async def persisted_events(conn: Any, entries: Sequence[OutboxEntry]) -> set[str]:
    """Entry ids whose effect is in PostgreSQL: a booking row for a claim, a cancelled
    booking for a cancellation."""
    by_claim: dict[str, str] = {}
    cancels: dict[str, str] = {}
    for entry in entries:
        claim_id = orjson.loads(entry.event)["claim_id"]
        (cancels if entry.event_type == "claim.cancelled" else by_claim)[claim_id] = entry.entry_id
    done: set[str] = set()
    if by_claim:
        rows = await conn.fetch("SELECT claim_id FROM bookings WHERE claim_id = ANY($1::text[])",
                                list(by_claim))
        done |= {by_claim[r["claim_id"]] for r in rows}
    if cancels:
        rows = await conn.fetch(
            "SELECT claim_id FROM bookings WHERE claim_id = ANY($1::text[]) "
            "AND cancelled_at IS NOT NULL", list(cancels))
        done |= {cancels[r["claim_id"]] for r in rows}
    return done


class Reconciler:
    def __init__(self, settings: Settings, redis: AnyRedis, pool: asyncpg.Pool,
                 producer: AIOKafkaProducer, grace_seconds: float | None = None) -> None:
        self._redis = redis
        self._pool = pool
        self._producer = producer
        self._grace = settings.reconcile_grace_seconds if grace_seconds is None else grace_seconds
        # What this process republished and when: once per grace period, not every pass.
        self._republished_at: dict[str, float] = {}

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._republished_at.get(key, -1e12) < max(self._grace, 1.0):
            return False
        self._republished_at[key] = now
        return True

    async def run_once(self, *, full: bool = False, progress: bool = False) -> ReconcileReport:
        report = ReconcileReport()
        release_ids = await active_release_ids(self._redis)
        for rid in tqdm(release_ids, desc="reconcile", unit="release", disable=not progress):
            report.add(await self._release(rid, full))
        report.releases = len(release_ids)
        report.add(await self._missing_sms())
        if full:
            report.stale_reservations = await self._stale_reservations(progress)
        if len(self._republished_at) > 1_000_000:
            self._republished_at.clear()
        return report

    async def _release(self, rid: str, full: bool) -> ReconcileReport:
        report = ReconcileReport()
        outbox = keys.outbox_key(rid)
        pending = {
            p["message_id"].decode()
            for p in await self._redis.xpending_range(outbox, keys.OUTBOX_GROUP, "-", "+", 100_000)
        } if await self._redis.exists(outbox) and await self._has_group(outbox) else set()
        in_outbox: set[str] = set()
        start = "-"
        while True:
            page = await self._redis.xrange(outbox, min=start, count=PAGE)
            if not page:
                break
            entries = [parse_entry(rid, eid, f) for eid, f in page if f]
            report.outbox_entries += len(entries)
            in_outbox |= {orjson.loads(e.event)["claim_id"] for e in entries}
            async with self._pool.acquire() as conn:
                done = await persisted_events(conn, entries)
            if done:
                pipe = self._redis.pipeline(transaction=False)
                pipe.xack(outbox, keys.OUTBOX_GROUP, *done)
                pipe.xdel(outbox, *done)
                await pipe.execute()
                report.trimmed += len(done)
            # Acknowledged by Kafka yet not persisted after the grace period: send again.
            # (Unacknowledged ones are the relays' to retry or take over.)
            lost = [e for e in entries if e.entry_id not in done and e.entry_id not in pending
                    and e.age_seconds > self._grace and self._due(e.entry_id)]
            report.republished += await self._publish(lost)
            start = "(" + page[-1][0].decode()
        if full:
            report.add(await self._claims_without_bookings(rid, in_outbox))
        return report

    async def _stale_reservations(self, progress: bool) -> int:
        """Remove per-person reservations whose claim is not (or no longer) a confirmed
        booking: left by a gateway that died between reserving and claiming, or between
        cancelling and releasing. Only entries older than the grace period are judged."""
        removed = 0
        cutoff_ms = (time.time() - self._grace) * 1000
        bar = tqdm(desc="reservations", unit="person", disable=not progress)
        async for key in self._redis.scan_iter(match="person:*:active", count=1000):
            bar.update(1)
            entries = await self._redis.hgetall(key)
            for claim_id, value in entries.items():
                release_id, *_, claimed_ms = value.decode().split("|")
                if int(claimed_ms) > cutoff_ms:
                    continue
                raw = await self._redis.hget(keys.claims_key(release_id), claim_id)
                if raw is None or orjson.loads(raw).get("status") != "confirmed":
                    removed += await self._redis.hdel(key, claim_id)
        bar.close()
        return removed

    async def _has_group(self, outbox: str) -> bool:
        try:
            groups = await self._redis.xinfo_groups(outbox)
        except RedisError:
            return False
        return any(g["name"] in (keys.OUTBOX_GROUP, keys.OUTBOX_GROUP.encode()) for g in groups)

    async def _claims_without_bookings(self, rid: str, in_outbox: set[str]) -> ReconcileReport:
        report = ReconcileReport()
        batch: list[tuple[str, bytes]] = []

        async def check(claims: list[tuple[str, bytes]]) -> None:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT claim_id FROM bookings WHERE claim_id = ANY($1::text[])",
                    [c for c, _ in claims])
            found = {r["claim_id"] for r in rows}
            missing = [(c, data) for c, data in claims if c not in found and c not in in_outbox]
            report.missing_bookings += len(missing)
            entries = [_entry(rid, data) for c, data in missing if self._due(c)]
            report.republished += await self._publish(entries)

        async for claim_id, data in self._redis.hscan_iter(keys.claims_key(rid), count=PAGE):
            claim = orjson.loads(data)
            if claim.get("status") != "confirmed" or claim_id.decode() in in_outbox:
                continue
            if time.time() - claim["claimed_at_ms"] / 1000 < self._grace:
                continue
            batch.append((claim_id.decode(), data))
            if len(batch) >= PAGE:
                await check(batch)
                batch = []
        if batch:
            await check(batch)
        return report

    async def _missing_sms(self) -> ReconcileReport:
        report = ReconcileReport()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT b.* FROM bookings b
                   LEFT JOIN sms_messages s ON s.claim_id = b.claim_id AND s.kind = $1
                   WHERE (s.claim_id IS NULL OR (s.status = 'pending'
                                                 AND s.created_at < now() - $2::interval))
                     AND b.persisted_at < now() - $2::interval
                   LIMIT 5000""",
                SMS_KIND_CONFIRMATION, _interval(self._grace))
        report.missing_sms = len(rows)
        entries = [_entry(r["release_id"], claim_event(r)) for r in rows
                   if self._due("sms:" + r["claim_id"])]
        report.republished += await self._publish(entries)
        return report

    async def _publish(self, entries: Sequence[OutboxEntry]) -> int:
        if not entries:
            return 0
        sent = await publish(self._producer, entries)
        return sum(sent)


def _entry(release_id: str, event: bytes) -> OutboxEntry:
    claim = orjson.loads(event)
    return OutboxEntry(release_id, f"{claim['claimed_at_ms']}-0", "claim.confirmed", event,
                       claim["person_id"])


def _interval(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


async def reconcile_forever(settings: Settings, redis: AnyRedis,
                            producer: AIOKafkaProducer) -> None:
    """The relay's timer: a pass every few seconds; failures are logged and retried."""
    pool = await connect_pool(settings, max_size=2)
    reconciler = Reconciler(settings, redis, pool, producer)
    try:
        while True:
            await asyncio.sleep(INTERVAL_SECONDS)
            try:
                report = await reconciler.run_once()
            except (RedisError, OSError, KafkaError, asyncpg.PostgresError) as exc:
                log.warning("reconcile pass failed: %s", exc)
                continue
            if report.republished:
                log.info("reconcile republished %d events (%s)", report.republished,
                         ", ".join(report.lines()))
    finally:
        await pool.close()


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = load_settings()

    async def main() -> ReconcileReport:
        redis = redis_from_url(settings.redis_url)
        pool = await connect_pool(settings, max_size=2)
        producer = kafka_producer(settings)
        await producer.start()
        try:
            reconciler = Reconciler(settings, redis, pool, producer, grace_seconds=args.grace)
            return await reconciler.run_once(full=True, progress=True)
        finally:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            await pool.close()
            await redis.aclose()

    report = asyncio.run(main())
    print("\n".join(report.lines()))
    print("all consistent" if not report.republished else
          f"repaired: {report.republished} events published again")
    return 0
