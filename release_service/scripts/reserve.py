"""The typed wrapper of `lua/person_reserve.lua`, and releasing a reservation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import RedisCluster
from redis.crc import key_slot

from ..core import keys
from .client import AnyRedis
from .replicated import ReplicatedScript
from .source import SEPARATOR, lua_source

if TYPE_CHECKING:  # the limits are the person's rules; this only passes them on
    from ..people.limits import BookingLimits


@dataclass(frozen=True, slots=True)
class Reservation:
    claim_id: str
    person_id: str
    release_id: str
    day: str  # YYYYMMDD
    clinic_id: str
    department: str
    limits: BookingLimits


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    status: str  # ok, banned (detail: until, Unix ms), already_claimed, removed,
    #              limit_reached (detail: which limit)
    detail: str = ""
    held: str = ""  # already_claimed: the claim id of the reservation found


def packed(r: Reservation) -> str:
    """One reservation as the script's argument: the fields of lua/person_reserve.lua's
    header, in order."""
    lim = r.limits
    return SEPARATOR.join((
        r.claim_id, r.release_id, r.day, r.clinic_id, r.department, str(lim.same_day_clinic),
        str(lim.per_day), str(lim.per_7_days), str(lim.per_3_months)))


class ReserveScript:
    def __init__(self, redis: AnyRedis, min_replicas: int = 0,
                 replica_timeout_ms: int = 500) -> None:
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        # On one primary the claim's WAIT, after this, covers the reservation too; on a
        # Cluster the person's shard is another, and waits for its own replicas.
        self._reserve = ReplicatedScript(redis, lua_source("person_reserve.lua"),
                                         min_replicas if self._cluster else 0,
                                         replica_timeout_ms)

    async def reserve(self, _key: str, batch: Sequence[Reservation]) -> list[ReserveOutcome]:
        """One script call per Cluster slot of the batch: a single call on one Redis."""
        if not self._cluster:  # awaited as it is: no task, no extra turn of the loop
            script_keys, args = self._arguments(batch)
            return self._outcomes(await self._reserve(keys=script_keys, args=args))
        groups: dict[int, list[int]] = {}
        for index, r in enumerate(batch):
            groups.setdefault(key_slot(keys.person_active_key(r.person_id).encode()),
                              []).append(index)
        calls = [self._arguments([batch[i] for i in members]) for members in groups.values()]
        # Concurrent calls: a Cluster pipeline may not carry scripts.
        replies = await asyncio.gather(*(self._reserve(keys=k, args=a) for k, a in calls))
        outcomes: list[ReserveOutcome] = [ReserveOutcome("")] * len(batch)
        for members, reply in zip(groups.values(), replies, strict=True):
            for index, outcome in zip(members, self._outcomes(reply), strict=True):
                outcomes[index] = outcome
        return outcomes

    @staticmethod
    def _outcomes(reply: list[bytes]) -> list[ReserveOutcome]:
        outcomes = []
        for i in range(0, len(reply), 2):
            status, detail = reply[i].decode(), reply[i + 1].decode()
            outcomes.append(ReserveOutcome(status, held=detail) if status == "already_claimed"
                            else ReserveOutcome(status, detail))
        return outcomes

    @staticmethod
    def _arguments(batch: Sequence[Reservation]) -> tuple[list[str], list[str]]:
        script_keys: list[str] = []
        args: list[str] = []
        for r in batch:
            script_keys += (keys.person_active_key(r.person_id), keys.person_ban_key(r.person_id))
            args.append(packed(r))
        return script_keys, args

    async def unreserve(self, entries: Sequence[tuple[str, str]]) -> list[None]:
        """Remove (person_id, claim_id) reservations: the claim did not happen, or the
        booking ended (cancelled, attended, no-show). One pipeline for all."""
        if not entries:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for person_id, claim_id in entries:
            pipe.hdel(keys.person_active_key(person_id), claim_id)
        await pipe.execute()
        return [None] * len(entries)

    async def unreserve_batch(self, _key: str, entries: Sequence[tuple[str, str]]
                              ) -> list[None]:
        return await self.unreserve(entries)
