"""The typed wrapper of `lua/rate_limit.lua`: fixed-window request counters, counted in
one script call per Redis Cluster slot (a single call on one Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import RedisCluster
from redis.crc import key_slot

from .client import AnyRedis
from .source import lua_source


@dataclass(frozen=True, slots=True)
class RateCounter:
    key: str  # one rule and subject, e.g. rl:{account:a_1}:lookups
    limit: int  # requests per window
    window_ms: int
    cost: int = 1  # 0: only look whether the budget is already spent


class RateLimitScript:
    def __init__(self, redis: AnyRedis) -> None:
        self._cluster = isinstance(redis, RedisCluster)
        self._script = redis.register_script(lua_source("rate_limit.lua"))

    async def __call__(self, counters: Sequence[RateCounter]) -> list[int]:
        """Count each counter; per counter 0 within its limit, else the milliseconds until
        its window ends. Counters on different Cluster slots go in concurrent calls."""
        groups: dict[int, list[int]] = {}
        for index, c in enumerate(counters):
            slot = key_slot(c.key.encode()) if self._cluster else 0
            groups.setdefault(slot, []).append(index)
        calls = []
        for members in groups.values():
            script_keys: list[str] = []
            args: list[int] = []
            for i in members:
                c = counters[i]
                script_keys.append(c.key)
                args += (c.limit, c.window_ms, c.cost)
            calls.append(self._script(keys=script_keys, args=args))
        replies = await asyncio.gather(*calls) if len(calls) > 1 else [await calls[0]]
        waits = [0] * len(counters)
        for members, reply in zip(groups.values(), replies, strict=True):
            for position, index in enumerate(members):
                waits[index] = int(reply[position])
        return waits
