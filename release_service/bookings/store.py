"""Bookings as residents see them: PostgreSQL first, the Redis claim as the fallback for a
booking accepted seconds ago and not yet persisted (a resident never sees "not found" for
a code they were just given)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from ..core import keys
from ..scripts.booking_codes import is_code, seq_for
from ..scripts.client import AnyRedis


@dataclass(frozen=True, slots=True)
class Booking:
    claim_id: str
    code: str
    release_id: str
    slot_id: str
    person_id: str
    account_id: str
    status: str
    claimed_at_ms: int
    cancelled_at_ms: int | None
    persisted: bool

    def claim_record(self) -> dict[str, Any]:
        return {"claim_id": self.claim_id, "code": self.code, "release_id": self.release_id,
                "slot_id": self.slot_id, "person_id": self.person_id,
                "account_id": self.account_id, "status": self.status,
                "claimed_at_ms": self.claimed_at_ms}


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def from_row(row: Any) -> Booking:
    return Booking(row["claim_id"], row["code"].strip(), row["release_id"], row["slot_id"],
                   row["person_id"], row["account_id"], row["status"],
                   _ms(row["claimed_at"]) or 0, _ms(row["cancelled_at"]), True)


def from_claim(claim: dict[str, Any]) -> Booking:
    return Booking(claim["claim_id"], claim["code"], claim["release_id"], claim["slot_id"],
                   claim["person_id"], claim["account_id"], claim["status"],
                   claim["claimed_at_ms"], claim.get("cancelled_at_ms"), False)


class BookingStore:
    def __init__(self, pool: asyncpg.Pool, redis: AnyRedis, code_keys: list[int]) -> None:
        self._pool = pool
        self._redis = redis
        self._code_keys = code_keys

    async def by_code(self, code: str, account_id: str) -> Booking | None:
        """The account's booking with this code, or None: also for another account's code
        (the same lookups run either way, so timing does not tell them apart)."""
        if not is_code(code):
            return None
        row = await self._pool.fetchrow("SELECT * FROM bookings WHERE code = $1", code)
        redis_booking = await self._from_redis(code)
        booking = from_row(row) if row is not None else redis_booking
        if booking is None or booking.account_id != account_id:
            return None
        if redis_booking is not None and redis_booking.status != booking.status and \
                booking.status == "confirmed":
            return redis_booking  # cancelled in Redis a moment ago, not yet persisted
        return booking

    async def _from_redis(self, code: str) -> Booking | None:
        release_id = await self._pool.fetchval(
            "SELECT release_id FROM code_blocks WHERE first_seq <= $1 "
            "AND first_seq + size > $1", seq_for(code, self._code_keys))
        if release_id is None:
            return None
        claim_id = await self._redis.hget(keys.codes_key(release_id), code)
        raw = await self._redis.hget(keys.claims_key(release_id), claim_id) if claim_id else None
        return from_claim(orjson.loads(raw)) if raw else None

    async def of_account(self, account_id: str, limit: int = 100) -> list[Booking]:
        rows = await self._pool.fetch(
            "SELECT * FROM bookings WHERE account_id = $1 ORDER BY claimed_at DESC LIMIT $2",
            account_id, limit)
        return [from_row(r) for r in rows]
