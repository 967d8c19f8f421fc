"""The typed wrapper of `lua/claim.lua`: arguments in, `ClaimOutcome`s out.

Nothing else in the code knows the script's ARGV layout or the shape of its reply.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..core import keys
from ..core.errors import ServiceError
from .booking_codes import code_keys
from .client import AnyRedis, reply_text
from .replicated import ReplicatedScript
from .source import SEPARATOR, lua_source


@dataclass(frozen=True, slots=True)
class ClaimLimit:
    """A rate counter the claim spends, on the release's slot (keys.claim_rate_key)."""
    key: str
    limit: int
    window_ms: int
    name: str  # for the 429: e.g. "claims per account"


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    claim_id: str
    account_id: str
    person_id: str
    slot_id: str  # "" = any slot with stock
    idempotency_key: str  # "" = none
    birth: int  # YYYYMMDD
    sex: str
    day: str = ""  # YYYYMMDD: with slot_id "", any slot on that visit day only
    replay_only: bool = False  # only answer an idempotent replay; never take stock
    request_id: str = ""  # carried into the claim and its event, for tracing
    limits: tuple[ClaimLimit, ...] = ()
    # Set: book a slot held for the standby list; the person may decline for this long.
    standby_decline_ms: int | None = None
    drawn: bool = False  # a lottery winner: booked after the entry window closed
    admission: str = ""  # queue mode: the jti of the person's admission (spent if it wins)


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    status: str  # ok, replay, already_claimed, not_open, paused, closed, sold_out, day_full,
    #              admission (queue mode: detail says why), ...
    claim: dict[str, Any] | None = None
    detail: str = ""


_WITH_CLAIM = frozenset({"ok", "replay", "already_claimed"})
_TOLD_AS_WON = frozenset({"ok", "replay"})


@functools.lru_cache(maxsize=4096)
def release_keys(release_id: str) -> tuple[str, ...]:
    """The script's fixed KEYS, built once per release (every claim batch needs them)."""
    queue = keys.queue_keys(release_id)
    return (
        keys.meta_key(release_id), keys.capacity_key(release_id), keys.taken_key(release_id),
        keys.slot_day_key(release_id), keys.holders_key(release_id),
        keys.claims_key(release_id), keys.codes_key(release_id),
        keys.idempotency_key(release_id), keys.outbox_key(release_id),
        *(queue[name] for name in ("who", "live", "jtis")),
    )


class ClaimScript:
    """Loaded once per client; redis-py calls it by SHA and reloads it after NOSCRIPT."""

    def __init__(self, redis: AnyRedis, code_secret: str, min_replicas: int = 0,
                 replica_timeout_ms: int = 500) -> None:
        self._script = ReplicatedScript(redis, lua_source("claim.lua"), min_replicas,
                                        replica_timeout_ms)
        self._code_keys = code_keys(code_secret)

    async def __call__(
        self, release_id: str, requests: Sequence[ClaimRequest]
    ) -> list[ClaimOutcome]:
        """Every outcome, or ReplicasBehind for the whole batch if it won anything that
        the replicas did not confirm."""
        outcomes = []
        for outcome in await self.each(release_id, requests):
            if isinstance(outcome, ServiceError):
                raise outcome
            outcomes.append(outcome)
        return outcomes

    async def each(
        self, release_id: str, requests: Sequence[ClaimRequest]
    ) -> list[ClaimOutcome | ServiceError]:
        """Each claim's outcome; in a batch the replicas did not confirm, a win or replay
        is ReplicasBehind (it may or may not survive a failover) while a refusal stands as
        it is (it told nobody of a claim, and its reservation must go)."""
        argv: list[str | int] = [release_id, *self._code_keys, len(requests)]
        script_keys = list(release_keys(release_id))
        key_index: dict[str, int] = {}  # a counter shared by claims of the batch: one key
        for r in requests:
            spec = []
            for lim in r.limits:
                index = key_index.get(lim.key)
                if index is None:
                    script_keys.append(lim.key)
                    index = key_index[lim.key] = len(script_keys)
                spec.append(f"{index},{lim.limit},{lim.window_ms}")
            argv.append(packed(r, " ".join(spec)))
        reply, confirmed = await self._script.call(keys=script_keys, args=argv)
        outcomes: list[ClaimOutcome | ServiceError] = []
        for i in range(0, len(reply), 2):
            status = reply_text(reply[i])
            payload = reply[i + 1]
            if not confirmed and status in _TOLD_AS_WON:
                outcomes.append(self._script.behind())
            elif status in _WITH_CLAIM:
                outcomes.append(ClaimOutcome(status, orjson.loads(payload)))
            else:
                outcomes.append(ClaimOutcome(status, None, reply_text(payload)))
        return outcomes


def packed(r: ClaimRequest, limits: str = "") -> str:
    """One claim as the script's argument: the fields of lua/claim.lua's header, in order."""
    return SEPARATOR.join((
        r.claim_id, r.account_id, r.person_id, r.slot_id, r.idempotency_key, str(r.birth),
        r.sex, r.day, _mode(r), r.request_id, limits,
        "" if r.standby_decline_ms is None else str(r.standby_decline_ms), r.admission))


def _mode(request: ClaimRequest) -> str:
    if request.replay_only:
        return "replay"
    if request.drawn:
        return "draw"
    return "claim" if request.standby_decline_ms is None else "standby"

