"""The typed wrapper of `lua/person_reserve.lua`, and releasing a reservation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import keys
from .lua import lua_source
from .redis_client import AnyRedis


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-person booking limits (-1: none). Defaults are the hospital platform's."""

    same_day_clinic: int = 1
    per_day: int = 2
    per_7_days: int = 3
    per_3_months: int = 5


@dataclass(frozen=True, slots=True)
class Reservation:
    claim_id: str
    person_id: str
    release_id: str
    day: str  # YYYYMMDD
    clinic_id: str
    department: str
    limits: Limits


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    status: str  # ok, banned, already_claimed, limit_reached
    detail: str = ""


class PersonScript:
    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        self._reserve = redis.register_script(lua_source("person_reserve.lua"))

    async def reserve(self, _key: str, batch: Sequence[Reservation]) -> list[ReserveOutcome]:
        """One pipeline for the batch: the persons live on different slots."""
        pipe = self._redis.pipeline(transaction=False)
        for r in batch:
            lim = r.limits
            await self._reserve(
                keys=[keys.person_active_key(r.person_id), keys.person_ban_key(r.person_id)],
                args=[r.claim_id, r.release_id, r.day, r.clinic_id, r.department,
                      lim.same_day_clinic, lim.per_day, lim.per_7_days, lim.per_3_months],
                client=pipe)  # type: ignore[arg-type]  # a pipeline queues the call
        replies = await pipe.execute()
        return [ReserveOutcome(s.decode(), d.decode()) for s, d in replies]

    async def release(self, entries: Sequence[tuple[str, str]]) -> list[None]:
        """Remove (person_id, claim_id) reservations: the claim did not happen, or the
        booking ended (cancelled, attended, no-show). One pipeline for all."""
        if not entries:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for person_id, claim_id in entries:
            pipe.hdel(keys.person_active_key(person_id), claim_id)
        await pipe.execute()
        return [None] * len(entries)

    async def release_batch(self, _key: str, entries: Sequence[tuple[str, str]]) -> list[None]:
        return await self.release(entries)
