"""Reconcile: compare Redis (outbox, claims) with PostgreSQL (bookings, SMS rows) and repair.

- An outbox entry whose effect is in PostgreSQL is trimmed: the outbox is no longer the
  only copy.
- An outbox entry acknowledged by Kafka but still not in PostgreSQL after the grace
  period is published again (the broker lost it, or a consumer skipped it).
- A booking without its confirmation SMS (or with one stuck half-sent) after the grace
  period has its claim event published again, once the SMS consumer group has read
  every claim event (until then the SMS may be on its way): it sends what is missing.
- With `full`, every claim in Redis is checked for a booking, also those no longer in the
  outbox.
- After Redis restarted (its run id changed) and with `full`, every confirmed booking is
  checked for its claim in Redis: Redis restarted from an AOF without its last writes (an
  OS crash under appendfsync everysec) has lost them, and a booked claim that is not
  written back would have its slot sold again and its code issued again.

Everything it does is idempotent, so it is safe from several processes at once and a
no-op when all is well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from tqdm import tqdm

from ..core import keys, topics
from ..core.aio import wait_event
from ..core.db import connect_pool
from ..core.kafka import kafka_producer, unread
from ..core.settings import Settings, load_settings
from ..scripts.client import AnyRedis, check_topology, redis_client
from ..scripts.restore import RestoreScript
from .outbox import OutboxEntry, active_release_ids, parse_entry, publish

log = logging.getLogger(__name__)

PAGE = 1000
INTERVAL_SECONDS = 5.0
# How often the relay's timer asks Redis whether it restarted: lost claims are written
# back before the gateways can sell their slots again for long.
RESTART_POLL_SECONDS = 0.25
SMS_KIND_CONFIRMATION = "confirmation"


@dataclass
class ReconcileReport:
    releases: int = 0
    outbox_entries: int = 0
    trimmed: int = 0
    republished: int = 0
    missing_sms: int = 0
    sms_backlog: int = 0  # claim events the SMS consumers have not read: nothing republished
    missing_bookings: int = 0
    stale_reservations: int = 0
    restored: int = 0  # booked claims Redis had lost, written back
    restored_over_capacity: int = 0  # of those, slots sold again before the repair
    restored_person_twice: int = 0  # of those, persons who claimed again before it

    def add(self, other: ReconcileReport) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def repaired(self) -> int:
        return self.republished + self.restored

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


# Events whose only effect is an SMS, and the kind of its sms_messages row.
NOTICE_KINDS = {"lottery.lost": "lottery_lost", "standby.skipped": "standby_skipped"}


async def persisted_events(conn: Any, entries: Sequence[OutboxEntry]) -> set[str]:
    """Entry ids whose effect is in PostgreSQL: a booking row for a claim, a cancelled
    booking for a cancellation, an SMS sent (or given up on) for a notice (a lottery
    loser, a person skipped on the standby list), an admission row for an admission."""
    by_claim: dict[str, str] = {}
    cancels: dict[str, str] = {}
    notices: dict[tuple[str, str], str] = {}
    admissions: dict[str, str] = {}
    for entry in entries:
        event = orjson.loads(entry.event)
        claim_id = event["claim_id"]
        if entry.event_type in NOTICE_KINDS:
            notices[claim_id, NOTICE_KINDS[entry.event_type]] = entry.entry_id
            continue
        if entry.event_type == "queue.admitted":
            admissions[event["admission_id"]] = entry.entry_id
            continue
        (cancels if entry.event_type == "claim.cancelled" else by_claim)[claim_id] = entry.entry_id
    done: set[str] = set()
    if notices:
        rows = await conn.fetch(
            "SELECT m.claim_id, m.kind FROM sms_messages m "
            "JOIN unnest($1::text[], $2::text[]) AS k(claim_id, kind) "
            "ON m.claim_id = k.claim_id AND m.kind = k.kind WHERE m.status <> 'pending'",
            [c for c, _ in notices], [k for _, k in notices])
        done |= {notices[r["claim_id"], r["kind"]] for r in rows}
    if admissions:
        rows = await conn.fetch("SELECT admission_id FROM admissions "
                                "WHERE admission_id = ANY($1::text[])", list(admissions))
        done |= {admissions[r["admission_id"]] for r in rows}
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
        self._settings = settings
        self._redis = redis
        self._pool = pool
        self._producer = producer
        self._grace = settings.reconcile_grace_seconds if grace_seconds is None else grace_seconds
        # What this process republished and when: once per grace period, not every pass.
        self._republished_at: dict[str, float] = {}
        self._restore = RestoreScript(redis, settings.code_secret)
        # Run ids and replication ids of the Redis primaries at the last finished pass;
        # None: none yet.
        self._run_ids: frozenset[str] | None = None

    async def _server_run_ids(self) -> frozenset[str]:
        """Who the primaries are: a restart changes a server's run id, a failover (a
        replica promoted, perhaps without the old primary's last writes) its run id and
        replication id."""
        server, replication = await asyncio.gather(self._redis.info("server"),
                                                   self._redis.info("replication"))
        return frozenset(_run_ids(server)) | frozenset(_run_ids(replication, "master_replid"))

    async def redis_restarted(self) -> bool:
        """A Redis primary restarted or was replaced by a failover (or this is the first
        pass): it may lack writes."""
        return await self._server_run_ids() != self._run_ids

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._republished_at.get(key, -1e12) < max(self._grace, 1.0):
            return False
        self._republished_at[key] = now
        return True

    async def run_once(self, *, full: bool = False, progress: bool = False) -> ReconcileReport:
        report = ReconcileReport()
        run_ids = await self._server_run_ids()
        restore = full or run_ids != self._run_ids
        release_ids = await active_release_ids(self._redis)
        for rid in tqdm(release_ids, desc="reconcile", unit="release", disable=not progress):
            if restore:  # first: the outbox checks below read the claims it writes back
                report.add(await self._restore_lost_claims(rid))
            report.add(await self._release(rid, full))
        self._run_ids = run_ids  # only once the pass finished: a failed one is repeated
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

    async def _restore_lost_claims(self, rid: str) -> ReconcileReport:
        """Write back the claims of confirmed bookings that Redis no longer holds, with
        their holders, codes and per-person reservations."""
        report = ReconcileReport()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT b.*, r.clinic_id, r.department FROM bookings b "
                "JOIN releases r USING (release_id) "
                "WHERE b.release_id = $1 AND b.status = 'confirmed'", rid)
        for start in range(0, len(rows), PAGE):
            page = rows[start:start + PAGE]
            found = await self._redis.hmget(keys.claims_key(rid), [r["claim_id"] for r in page])
            lost = [r for r, raw in zip(page, found, strict=True) if raw is None]
            if not lost:
                continue
            counts = Counter(await self._restore(rid, [claim_event(r) for r in lost]))
            restored = len(lost) - counts["present"]
            report.restored += restored
            report.restored_over_capacity += counts["over_capacity"]
            report.restored_person_twice += counts["person_twice"]
            days = await self._redis.hmget(keys.slot_day_key(rid), [r["slot_id"] for r in lost])
            pipe = self._redis.pipeline(transaction=False)
            for r, day in zip(lost, days, strict=True):
                claimed_ms = int(r["claimed_at"].timestamp() * 1000)
                pipe.hsetnx(keys.person_active_key(r["person_id"]), r["claim_id"],
                            f"{rid}|{(day or b'').decode()}|{r['clinic_id']}|"
                            f"{r['department']}|{claimed_ms}")
            await pipe.execute()
            if restored:
                log.warning("release %s: %d booked claims missing from Redis written back "
                            "(%d over capacity, %d persons twice)", rid, restored,
                            counts["over_capacity"], counts["person_twice"])
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
        if rows:
            # Unread claim events may carry these very SMS (the SMS consumers are behind,
            # or stopped): republished only once everything is read, or a stopped
            # consumer would come back to the same events many times over.
            report.sms_backlog = await unread(self._settings, topics.SMS_GROUP, topics.CLAIMS)
            if report.sms_backlog:
                return report
        entries = [_entry(r["release_id"], claim_event(r)) for r in rows
                   if self._due("sms:" + r["claim_id"])]
        report.republished += await self._publish(entries)
        return report

    async def _publish(self, entries: Sequence[OutboxEntry]) -> int:
        if not entries:
            return 0
        sent = await publish(self._producer, entries)
        return sum(sent)


def _run_ids(info: Any, field: str = "run_id") -> Iterator[str]:
    """`field` of every server in an INFO reply (one server, or one dict per Cluster
    node)."""
    if isinstance(info, dict):
        for name, value in info.items():
            if name == field:
                yield f"{field}:{value}"
            else:
                yield from _run_ids(value, field)


def _entry(release_id: str, event: bytes) -> OutboxEntry:
    claim = orjson.loads(event)
    return OutboxEntry(release_id, f"{claim['claimed_at_ms']}-0", "claim.confirmed", event,
                       claim["person_id"])


def _interval(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


async def reconcile_forever(settings: Settings, redis: AnyRedis, producer: AIOKafkaProducer,
                            stopping: asyncio.Event) -> None:
    """The relay's timer: a pass every few seconds until `stopping`; failures are logged
    and retried. Ended by the event, not by cancellation alone: a redis-py command can
    absorb a cancellation, and the relay's shutdown would then wait for ever."""
    pool = await connect_pool(settings, max_size=2)
    reconciler = Reconciler(settings, redis, pool, producer)
    next_pass = time.monotonic() + INTERVAL_SECONDS
    try:
        while not await wait_event(stopping, RESTART_POLL_SECONDS):
            try:
                # A restarted Redis is repaired at once; otherwise a pass on the timer.
                if time.monotonic() < next_pass and not await reconciler.redis_restarted():
                    continue
                next_pass = time.monotonic() + INTERVAL_SECONDS
                report = await reconciler.run_once()
            except (RedisError, OSError, KafkaError, asyncpg.PostgresError) as exc:
                log.warning("reconcile pass failed: %s", exc)
                continue
            if report.repaired:
                log.info("reconcile repaired %d (%s)", report.repaired,
                         ", ".join(report.lines()))
    finally:
        await pool.close()


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = load_settings()

    async def main() -> ReconcileReport:
        await check_topology(settings)
        redis = redis_client(settings)
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
    print("all consistent" if not report.repaired else
          f"repaired: {report.republished} events published again, "
          f"{report.restored} booked claims written back to Redis")
    return 0
