"""Bookings consumer: claim, cancellation and waiting-room admission events into
PostgreSQL, a batch per transaction.

`decode` is pure (tested with plain records); `BookingsProcessor.handle` writes a batch
idempotently: a claim is inserted once (`ON CONFLICT DO NOTHING` on the claim id), a
cancellation marks the row cancelled (or inserts it cancelled when it overtook its claim:
the two topics are not ordered with each other), an admission is inserted once.
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
    run_until,
)
from release_service.core import topics as kafka_topics
from release_service.core.aio import run_until_signalled
from release_service.core.db import connect_pool
from release_service.core.settings import Settings

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


@dataclass(frozen=True, slots=True)
class AdmissionEvent:
    admission_id: str
    release_id: str
    person_id: str
    position: int
    admitted_at: datetime
    expires_at: datetime


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > 128:
        raise InvalidMessage(f"{name} must be a non-empty string")
    return value


def _moment(data: dict[str, Any], name: str) -> datetime:
    ms = data.get(name)
    if not isinstance(ms, int) or isinstance(ms, bool) or ms <= 0:
        raise InvalidMessage(f"{name} must be a positive integer")
    return datetime.fromtimestamp(ms / 1000, UTC)


def decode_admission(data: dict[str, Any]) -> AdmissionEvent:
    position = data.get("position")
    if not isinstance(position, int) or isinstance(position, bool) or position <= 0:
        raise InvalidMessage("position must be a positive integer")
    return AdmissionEvent(_text(data, "admission_id"), _text(data, "release_id"),
                          _text(data, "person_id"), position,
                          _moment(data, "admitted_at_ms"), _moment(data, "expires_at_ms"))


def decode(record: ConsumerRecord[bytes, bytes]) -> BookingEvent | AdmissionEvent:
    data = json_object(record)
    if record.topic == kafka_topics.ADMISSIONS:
        return decode_admission(data)
    values = {name: _text(data, name) for name in _FIELDS}
    if not (len(values["code"]) == 8 and values["code"].isdigit()):
        raise InvalidMessage("code must be 8 digits")
    claimed_at = _moment(data, "claimed_at_ms")
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
    group_id: str = kafka_topics.BOOKINGS_GROUP
    topics: tuple[str, ...] = (kafka_topics.CLAIMS, kafka_topics.CANCELLATIONS,
                               kafka_topics.ADMISSIONS)
    dead_letter_topic: str = kafka_topics.CLAIMS_DEAD_LETTER

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    decode = staticmethod(decode)

    async def handle(self, events: Sequence[BookingEvent | AdmissionEvent]
                     ) -> Sequence[DeadLetter]:
        bookings = [(i, e) for i, e in enumerate(events) if isinstance(e, BookingEvent)]
        admissions = [(i, e) for i, e in enumerate(events) if isinstance(e, AdmissionEvent)]
        async with self._pool.acquire() as conn, conn.transaction():
            dead = await self._bookings(conn, bookings) if bookings else []
            if admissions:
                dead += await self._admissions(conn, admissions)
        return dead

    async def _admissions(self, conn: Any, events: Sequence[tuple[int, AdmissionEvent]]
                          ) -> list[DeadLetter]:
        known = {r["release_id"] for r in await conn.fetch(
            "SELECT release_id FROM releases WHERE release_id = ANY($1::text[])",
            list({e.release_id for _, e in events}))}
        rows = [e for _, e in events if e.release_id in known]
        inserted = await conn.fetch(
            """INSERT INTO admissions (admission_id, release_id, person_id, position,
                                       admitted_at, expires_at)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                                    $5::timestamptz[], $6::timestamptz[])
               ON CONFLICT DO NOTHING RETURNING admission_id""",
            [e.admission_id for e in rows], [e.release_id for e in rows],
            [e.person_id for e in rows], [e.position for e in rows],
            [e.admitted_at for e in rows], [e.expires_at for e in rows])
        BOOKINGS_WRITTEN.labels("admission").inc(len(inserted))
        return [DeadLetter(i, "unknown release") for i, e in events if e.release_id not in known]

    async def _bookings(self, conn: Any, events: Sequence[tuple[int, BookingEvent]]
                        ) -> list[DeadLetter]:
        dead: list[DeadLetter] = []
        known = {
            (r["release_id"], r["slot_id"]) for r in await conn.fetch(
                "SELECT release_id, slot_id FROM slots WHERE (release_id, slot_id) IN "
                "(SELECT * FROM unnest($1::text[], $2::text[]))",
                [e.release_id for _, e in events], [e.slot_id for _, e in events])
        }
        rows: list[BookingEvent] = []
        for index, event in events:
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
            for index, event in events:
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
        runner: ConsumerRunner[BookingEvent | AdmissionEvent] = ConsumerRunner(
            settings, BookingsProcessor(pool))
        await run_until(runner, stopping)
    finally:
        await pool.close()


def main(settings: Settings) -> None:
    run_until_signalled(lambda stopping: serve(settings, stopping))
