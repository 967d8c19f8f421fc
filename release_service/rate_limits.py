"""Request rate limits shared by every gateway process: fixed-window counters in Redis.

A rule limits one kind of request (claims, lookups, lookup misses, one-time codes) per
subject (an account, a client address, a phone). The counters of a request are checked
in one script call per Cluster slot, and the calls of one event-loop tick share a batch,
so a limit costs the hot path one pipelined round trip rather than one per rule.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import RedisCluster
from redis.crc import key_slot

from . import errors
from .lua import lua_source
from .redis_client import AnyRedis
from .settings import Settings
from .tick_batcher import TickBatcher


@dataclass(frozen=True, slots=True)
class Rule:
    name: str  # what is counted, e.g. "claims"
    per: str  # whose: "account", "address" or "phone"
    limit: int  # requests per window; 0 = no limit
    window_seconds: int

    def key(self, subject: str) -> str:
        return f"rl:{{{self.per}:{subject}}}:{self.name}"


@dataclass(frozen=True, slots=True)
class Check:
    rule: Rule
    subject: str
    cost: int = 1  # 0: only look whether the budget is already spent


def rules_from(settings: Settings) -> dict[str, Rule]:
    """Every rule, by "name/per", from the settings."""
    made = [
        Rule("claims", "account", settings.rate_claims_per_account_per_minute, 60),
        Rule("claims", "address", settings.rate_claims_per_address_per_minute, 60),
        Rule("lookups", "account", settings.rate_lookups_per_account_per_minute, 60),
        Rule("lookups", "address", settings.rate_lookups_per_address_per_minute, 60),
        Rule("lookup_misses", "account", settings.rate_lookup_misses_per_account_per_hour,
             3600),
        Rule("lookup_misses", "address", settings.rate_lookup_misses_per_address_per_hour,
             3600),
        Rule("otp", "phone", settings.rate_otp_per_phone_per_day, 86400),
        Rule("otp", "address", settings.rate_otp_per_address_per_hour, 3600),
    ]
    return {f"{r.name}/{r.per}": r for r in made}


class RateLimits:
    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self.rules = rules_from(settings)
        self._cluster = isinstance(redis, RedisCluster)
        self._script = redis.register_script(lua_source("rate_limit.lua"))
        self._batcher: TickBatcher[Check, int] = TickBatcher("rate_limit", self._run)
        self._exempt = {a.strip() for a in settings.rate_limit_exempt_addresses.split(",")
                        if a.strip()}

    async def check(self, *checks: Check, message: str = "too many requests") -> None:
        """Count every check; raise RateLimited (429, Retry-After) if any is over."""
        counted = [c for c in checks if c.rule.limit > 0 and
                   not (c.rule.per == "address" and c.subject in self._exempt)]
        if not counted:
            return
        waits = await asyncio.gather(*(self._batcher.submit("", c) for c in counted))
        wait_ms = max(waits)
        if wait_ms > 0:
            refused = next(c.rule for c, w in zip(counted, waits, strict=True) if w == wait_ms)
            raise errors.RateLimited(f"{message}; try again later",
                                     retry_after=max(1, math.ceil(wait_ms / 1000)),
                                     limit=f"{refused.name} per {refused.per}")

    def of(self, name: str, per: str, subject: str, cost: int = 1) -> Check:
        return Check(self.rules[f"{name}/{per}"], subject, cost)

    async def drain(self) -> None:
        await self._batcher.drain()

    async def _run(self, _key: str, batch: Sequence[Check]) -> list[int]:
        groups: dict[int, list[int]] = {}
        for index, c in enumerate(batch):
            slot = key_slot(c.rule.key(c.subject).encode()) if self._cluster else 0
            groups.setdefault(slot, []).append(index)
        calls = []
        for members in groups.values():
            script_keys: list[str] = []
            args: list[int] = []
            for i in members:
                c = batch[i]
                script_keys.append(c.rule.key(c.subject))
                args += (c.rule.limit, c.rule.window_seconds * 1000, c.cost)
            calls.append(self._script(keys=script_keys, args=args))
        replies = await asyncio.gather(*calls)
        waits = [0] * len(batch)
        for members, reply in zip(groups.values(), replies, strict=True):
            for position, index in enumerate(members):
                waits[index] = int(reply[position])
        return waits


def client_address(peer: str | None, forwarded_for: str | None, trusted: frozenset[str]
                   ) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; then the
    nearest X-Forwarded-For hop that is not one (hops a client wrote itself are ignored)."""
    address = peer or "unknown"
    if address not in trusted or not forwarded_for:
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            hop = str(ipaddress.ip_address(hop))
        except ValueError:
            return address  # a malformed chain: trust only what we saw
        if hop not in trusted:
            return hop
    return address
