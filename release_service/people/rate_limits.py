"""Request rate limits shared by every gateway process: fixed-window counters in Redis.

A rule limits one kind of request (claims, lookups, lookup misses, one-time codes) per
subject (an account, a client address, a phone). The counters of a request are checked
in one script call per Cluster slot, and the calls of one event-loop tick share a batch,
so a limit costs one pipelined round trip rather than one per rule.

Claims are counted by the claim script itself, on the release's slot (per account and per
address in that release): the hot path pays no round trip for its limits. A process that
saw a subject refused answers its next claims at once until the window ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..core import errors, keys
from ..core.settings import Settings
from ..scripts.batcher import ONE_BATCH, TickBatcher
from ..scripts.claim import ClaimLimit
from ..scripts.client import AnyRedis
from ..scripts.rate_limit import RateCounter, RateLimitScript

# Spent claim counters a process remembers at most (a flood of distinct subjects must not
# grow memory; past it, refusals are simply answered by the script).
MAX_REMEMBERED = 100_000


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
        self._script = RateLimitScript(redis)
        self._batcher: TickBatcher[tuple[Check, ...], list[int]] = TickBatcher(
            "rate_limit", self._run)
        self._exempt = address_set(settings.rate_limit_exempt_addresses)
        self.trusted_proxies = address_set(settings.trusted_proxies)
        # Claim counter key -> loop time its window ends, for counters seen over the limit.
        self._spent_until: dict[str, float] = {}

    async def check(self, *checks: Check, message: str = "too many requests") -> None:
        """Count every check; raise RateLimited (429, Retry-After) if any is over."""
        counted = tuple(c for c in checks if c.rule.limit > 0 and
                        not (c.rule.per == "address" and c.subject in self._exempt))
        if not counted:
            return
        # One batch entry (one future) per request, however many rules it counts.
        waits = await self._batcher.submit(ONE_BATCH, counted)
        wait_ms = max(waits)
        if wait_ms > 0:
            refused = next(c.rule for c, w in zip(counted, waits, strict=True) if w == wait_ms)
            raise rate_limited(message, wait_ms, f"{refused.name} per {refused.per}")

    def claim_limits(self, release_id: str, account_id: str, address: str
                     ) -> tuple[ClaimLimit, ...]:
        """The counters a claim spends in the claim script."""
        made = []
        for per, subject in (("account", account_id), ("address", address)):
            rule = self.rules[f"claims/{per}"]
            if rule.limit > 0 and not (per == "address" and subject in self._exempt):
                made.append(ClaimLimit(keys.claim_rate_key(release_id, per, subject),
                                       rule.limit, rule.window_seconds * 1000,
                                       f"claims per {per}"))
        return tuple(made)

    def spent(self, limits: Sequence[ClaimLimit]) -> errors.ServiceError | None:
        """The 429 if this process already saw one of these counters spent, else None."""
        if not self._spent_until:
            return None
        now = asyncio.get_running_loop().time()
        for lim in limits:
            until = self._spent_until.get(lim.key, 0.0)
            if until > now:
                return rate_limited("too many claims", (until - now) * 1000, lim.name)
        return None

    def claim_refused(self, limits: Sequence[ClaimLimit], detail: str) -> errors.ServiceError:
        """The 429 for the script's "rate_limited" reply ("wait_ms,i"); remembers the spent
        counter so that the subject's next claims here cost no Redis call."""
        wait_ms, position = (int(part) for part in detail.split(","))
        spent = limits[position - 1]
        now = asyncio.get_running_loop().time()
        if len(self._spent_until) >= MAX_REMEMBERED:
            self._spent_until = {k: t for k, t in self._spent_until.items() if t > now}
        if len(self._spent_until) < MAX_REMEMBERED:
            self._spent_until[spent.key] = now + wait_ms / 1000
        return rate_limited("too many claims", wait_ms, spent.name)

    def of(self, name: str, per: str, subject: str, cost: int = 1) -> Check:
        return Check(self.rules[f"{name}/{per}"], subject, cost)

    async def drain(self) -> None:
        await self._batcher.drain()

    async def _run(self, _key: str, requests: Sequence[tuple[Check, ...]]) -> list[list[int]]:
        waits = await self._script([
            RateCounter(c.rule.key(c.subject), c.rule.limit, c.rule.window_seconds * 1000,
                        c.cost)
            for checks in requests for c in checks])
        outcomes = []
        start = 0
        for checks in requests:
            outcomes.append(waits[start:start + len(checks)])
            start += len(checks)
        return outcomes


def rate_limited(message: str, wait_ms: float, limit: str) -> errors.ServiceError:
    """The 429: Retry-After in whole seconds (at least 1), and the limit's name."""
    return errors.RateLimited(f"{message}; try again later",
                              retry_after=max(1, math.ceil(wait_ms / 1000)), limit=limit)


def address_set(text: str) -> frozenset[str]:
    """A comma-separated list of addresses from the settings, parsed once."""
    return frozenset(a.strip() for a in text.split(",") if a.strip())


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
