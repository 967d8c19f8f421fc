"""The typed wrappers of `lua/standby_join.lua` (run after `lua/eligibility.lua`) and
`lua/standby_offer.lua`: joining a sold-out release's standby list, and one step of
handing a cancelled slot to the first person on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from ..core import keys
from .client import AnyRedis, reply_text
from .source import lua_source


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    status: str  # ok, already_listed, already_claimed, not_sold_out, closed, not_found,
    #              not_eligible
    position: int = 0  # from 1; 0 when not listed
    length: int = 0
    detail: str = ""  # not_eligible: "sex" or "age"


class Refusal(NamedTuple):
    """An offer the person's limits or eligibility refused: the offer script's ARGV 3-5."""

    claim_id: str
    reason: str  # a person_reserve.lua or claim.lua status, e.g. limit_reached
    detail: str  # e.g. same_day_clinic


@dataclass(frozen=True, slots=True)
class OfferStep:
    status: str  # offer (book `offer`), granted (`claim` booked: the handoff is finished),
    #              returned (the list was empty: `slot_id` is back on sale), gone (no such
    #              handoff: finished by another gateway)
    # offer: the handoff record {slot_id, at_ms, person_id, claim_id, who}, `who` being
    # the person's standby entry {account_id, birth, sex, joined_at_ms, request_id}
    offer: dict[str, Any] | None = None
    claim: dict[str, Any] | None = None  # granted: the claim JSON
    slot_id: str = ""  # returned


class StandbyScripts:
    def __init__(self, redis: AnyRedis) -> None:
        self._join = redis.register_script(
            lua_source("eligibility.lua") + lua_source("standby_join.lua"))
        self._offer = redis.register_script(lua_source("standby_offer.lua"))

    async def join(self, release_id: str, person_id: str, account_id: str, birth: int,
                   sex: str, request_id: str = "") -> JoinOutcome:
        status, position, length = await self._join(keys=[
            keys.meta_key(release_id), keys.slot_day_key(release_id),
            keys.holders_key(release_id), keys.standby_key(release_id),
            keys.standby_people_key(release_id),
        ], args=[person_id, account_id, birth, sex, request_id])
        status = reply_text(status)
        if status == "not_eligible":
            return JoinOutcome(status, detail=reply_text(position))
        return JoinOutcome(status, int(position), int(length))

    async def offer(self, release_id: str, handoff_id: str, fresh_claim_id: str,
                    refusal: Refusal | None = None) -> OfferStep:
        """One step of the handoff: `fresh_claim_id` names a new offer's claim; `refusal`
        reports the current offer refused (its person leaves the list unbooked)."""
        status, payload = await self._offer(keys=[
            keys.meta_key(release_id), keys.taken_key(release_id),
            keys.claims_key(release_id), keys.standby_key(release_id),
            keys.standby_people_key(release_id), keys.handoffs_key(release_id),
            keys.outbox_key(release_id), keys.standby_left_key(release_id),
        ], args=[handoff_id, fresh_claim_id, *(refusal or ("", "", "")), release_id])
        status = reply_text(status)
        if status == "offer":
            return OfferStep(status, offer=orjson.loads(payload))
        if status == "granted":
            return OfferStep(status, claim=orjson.loads(payload))
        return OfferStep(status, slot_id=reply_text(payload))
