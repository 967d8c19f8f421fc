"""Bookings consumer: claim and cancellation events into PostgreSQL, a batch per transaction.

`decode` is pure (tested with plain records); `BookingsProcessor.handle` writes a batch
idempotently: a claim is inserted once (`ON CONFLICT DO NOTHING` on the claim id), a
cancellation marks the row cancelled (or inserts it cancelled when it overtook its claim:
the two topics are not ordered with each other).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord
from prometheus_client import Counter

from consumers.runner import (
    ConsumerRunner,
    DeadLetter,
    InvalidMessage,
    json_object,
    main_until_signalled,
    run_until,
)
from release_service import topics as kafka_topics
from release_service.db import connect_pool
from release_service.settings import Settings

BOOKINGS_WRITTEN = Counter("release_bookings_written_total",
                           "Booking rows inserted or updated", ["kind"])

_FIELDS = ("claim_id", "code", "release_id", "slot_id", "person_id", "account_id")


@dataclass(frozen=True, slots=True)
class BookingEvent:
    kind: str  # "claim" or "cancel"
    claim_id: str
    code: str
    release_id: str
    slot_id: str
    person_id: str
    account_id: str
    claimed_at: datetime
    cancelled_at: datetime | None


def decode(record: ConsumerRecord[bytes, bytes]) -> BookingEvent:
    data = json_object(record)
    values: dict[str, Any] = {}
    for name in _FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not value or len(value) > 128:
            raise InvalidMessage(f"{name} must be a non-empty string")
        values[name] = value
    if not (len(values["code"]) == 8 and values["code"].isdigit()):
        raise InvalidMessage("code must be 8 digits")
    claimed_ms = data.get("claimed_at_ms")
    if not isinstance(claimed_ms, int) or isinstance(claimed_ms, bool) or claimed_ms <= 0:
        raise InvalidMessage("claimed_at_ms must be a positive integer")
    claimed_at = datetime.fromtimestamp(claimed_ms / 1000, UTC)
    if record.topic == kafka_topics.CANCELLATIONS:
        cancelled_ms = data.get("cancelled_at_ms")
        if not isinstance(cancelled_ms, int) or isinstance(cancelled_ms, bool):
            raise InvalidMessage("cancelled_at_ms must be an integer")
        return BookingEvent("cancel", claimed_at=claimed_at,
                            cancelled_at=datetime.fromtimestamp(cancelled_ms / 1000, UTC),
                            **values)
    return BookingEvent("claim", claimed_at=claimed_at, cancelled_at=None, **values)


_INSERT = """
INSERT INTO bookings (claim_id, code, release_id, slot_id, person_id, account_id,
                      claimed_at, status, cancelled_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::text[], $9::timestamptz[])
ON CONFLICT DO NOTHING
RETURNING claim_id
"""

_CANCEL = """
UPDATE bookings b SET status = 'cancelled', cancelled_at = c.cancelled_at
FROM unnest($1::text[], $2::timestamptz[]) AS c(claim_id, cancelled_at)
WHERE b.claim_id = c.claim_id AND b.status = 'confirmed'
RETURNING b.claim_id
"""


class BookingsProcessor:
    group_id: str = "bookings"
    topics: tuple[str, ...] = (kafka_topics.CLAIMS, kafka_topics.CANCELLATIONS)
    dead_letter_topic: str = kafka_topics.CLAIMS_DEAD_LETTER

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    decode = staticmethod(decode)

    async def handle(self, events: Sequence[BookingEvent]) -> Sequence[DeadLetter]:
        dead: list[DeadLetter] = []
        async with self._pool.acquire() as conn, conn.transaction():
            known = {
                (r["release_id"], r["slot_id"]) for r in await conn.fetch(
                    "SELECT release_id, slot_id FROM slots WHERE (release_id, slot_id) IN "
                    "(SELECT * FROM unnest($1::text[], $2::text[]))",
                    [e.release_id for e in events], [e.slot_id for e in events])
            }
            rows: list[BookingEvent] = []
            for index, event in enumerate(events):
                if (event.release_id, event.slot_id) not in known:
                    dead.append(DeadLetter(index, "unknown release or slot"))
                else:
                    rows.append(event)
            # Claims and cancellations both insert (a cancellation may come first); an
            # existing row is then updated by the cancellations.
            inserted = await conn.fetch(_INSERT, *_columns(rows))
            cancels = [e for e in rows if e.kind == "cancel"]
            updated = await conn.fetch(
                _CANCEL, [e.claim_id for e in cancels], [e.cancelled_at for e in cancels]
            ) if cancels else []
            missing = {e.claim_id for e in rows} - {r["claim_id"] for r in inserted}
            if missing:
                # Not inserted: the claim id exists (a replay, fine) or, never by design,
                # another booking holds the code. The latter must not vanish silently.
                present = {r["claim_id"] for r in await conn.fetch(
                    "SELECT claim_id FROM bookings WHERE claim_id = ANY($1::text[])",
                    list(missing))}
                for index, event in enumerate(events):
                    if event.claim_id in missing - present:
                        dead.append(DeadLetter(index, "booking code already used"))
        BOOKINGS_WRITTEN.labels("claim").inc(len(inserted))
        BOOKINGS_WRITTEN.labels("cancel").inc(len(updated))
        return dead


def _columns(rows: Sequence[BookingEvent]) -> list[list[Any]]:
    return [
        [e.claim_id for e in rows], [e.code for e in rows], [e.release_id for e in rows],
        [e.slot_id for e in rows], [e.person_id for e in rows], [e.account_id for e in rows],
        [e.claimed_at for e in rows],
        ["cancelled" if e.kind == "cancel" else "confirmed" for e in rows],
        [e.cancelled_at for e in rows],
    ]


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    pool = await connect_pool(settings)
    try:
        runner: ConsumerRunner[BookingEvent] = ConsumerRunner(settings, BookingsProcessor(pool))
        await run_until(runner, stopping)
    finally:
        await pool.close()


def main(settings: Settings) -> None:
    main_until_signalled(serve, settings)
