"""The standby list of a sold-out release: joining it, and handing a cancelled slot to the
first person on it (`lua/standby_join.lua`, `lua/standby_offer.lua` through their wrappers
in scripts/standby.py, and claim.lua's standby mode).

A handoff is safely two-phase because the person's limits live on the person's own Cluster
slot: each step is one atomic script, and the handoff record (under the release's hash
tag) says how far it got, so a gateway that dies mid-way leaves work any gateway resumes
with the same person and claim id (`resume`). The slot stays taken the whole time: it is
never on sale while someone on the list could have it. A person the limits or eligibility
refuse leaves the list unbooked: `standby_offer.lua` records why (shown on their place) and
puts a `standby.skipped` event in the outbox, which becomes their SMS.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from ..core import keys
from ..core.aio import wait_event
from ..releases.catalog import ReleaseCatalog
from ..scripts.claim import ClaimRequest, ClaimScript
from ..scripts.client import AnyRedis, reply_text
from ..scripts.reserve import Reservation, ReserveScript
from ..scripts.standby import JoinOutcome, Refusal, StandbyScripts

log = logging.getLogger(__name__)

HANDOFFS = Counter("release_standby_handoffs_total",
                   "Cancelled slots handed on: booked for standby, or back on sale",
                   ["result"])
# Offers tried in one pass before leaving the rest to `resume` (a list of refusals).
MAX_OFFERS_PER_PASS = 200


@dataclass(frozen=True, slots=True)
class StandbyPlace:
    status: str  # ok (listed), not_listed
    position: int = 0  # from 1; 0 when not listed
    length: int = 0
    claim: dict[str, Any] | None = None  # the person's claim in the release
    # Not listed: why the person last left the list unbooked {reason, detail, at_ms}
    left: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class HandoffResult:
    status: str  # granted (claim booked), returned (back on sale), gone, pending
    claim: dict[str, Any] | None = None



class StandbyList:
    def __init__(self, redis: AnyRedis, claims: ClaimScript, persons: ReserveScript,
                 catalog: ReleaseCatalog, decline_seconds: float) -> None:
        self._redis = redis
        self._scripts = StandbyScripts(redis)
        self._claims = claims
        self._persons = persons
        self._catalog = catalog
        self._decline_ms = int(decline_seconds * 1000)

    async def join(self, release_id: str, person_id: str, account_id: str, birth: int,
                   sex: str, request_id: str = "") -> JoinOutcome:
        return await self._scripts.join(release_id, person_id, account_id, birth, sex,
                                        request_id)

    async def place(self, release_id: str, person_id: str) -> StandbyPlace:
        """The person's place on the list, or the claim the person holds in the release
        (a slot handed over from the list shows here before its SMS arrives)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrank(keys.standby_key(release_id), person_id)
        pipe.zcard(keys.standby_key(release_id))
        pipe.hget(keys.holders_key(release_id), person_id)
        pipe.hget(keys.standby_left_key(release_id), person_id)
        rank, length, held, left = await pipe.execute()
        if rank is not None:
            return StandbyPlace("ok", int(rank) + 1, int(length))
        raw = await self._redis.hget(keys.claims_key(release_id), held) if held else None
        return StandbyPlace("not_listed", 0, int(length),
                            claim=orjson.loads(raw) if raw else None,
                            left=orjson.loads(left) if left else None)

    async def length(self, release_id: str) -> int:
        return int(await self._redis.zcard(keys.standby_key(release_id)))

    async def hand_on(self, release_id: str, handoff_id: str) -> HandoffResult:
        """Offer the held slot down the list until one person is booked or the list is
        empty (slot back on sale). Repeatable: a second caller finds the same offer."""
        refusal: Refusal | None = None
        for _ in range(MAX_OFFERS_PER_PASS):
            step = await self._scripts.offer(release_id, handoff_id, os.urandom(12).hex(),
                                             refusal)
            if step.status == "granted":
                HANDOFFS.labels("granted").inc()
                return HandoffResult(step.status, step.claim)
            if step.offer is None:  # returned (back on sale) or gone (finished elsewhere)
                if step.status == "returned":
                    HANDOFFS.labels("returned").inc()
                return HandoffResult(step.status)
            refusal = await self._book(release_id, step.offer)
        return HandoffResult("pending")

    async def _book(self, release_id: str, offer: dict[str, Any]) -> Refusal | None:
        """Reserve the person's limits, then book the held slot; the refusal when refused
        (the reservation is then removed again)."""
        view = self._catalog.get(release_id)
        if view is None:
            raise LookupError(f"release {release_id} is not served")
        person_id, claim_id, slot_id = offer["person_id"], offer["claim_id"], offer["slot_id"]
        who = offer["who"]
        day = view.visit_day(slot_id) or ""
        doc = view.document
        # A resumed offer may hold its reservation already (same claim id); so may a
        # second gateway handing on the same offer at once, which the reservation then
        # refuses as already_claimed: the reservation is this offer's all the same.
        active = keys.person_active_key(person_id)
        if not await self._redis.hexists(active, claim_id):
            [outcome] = await self._persons.reserve("", [Reservation(
                claim_id, person_id, release_id, day, doc["clinic_id"], doc["department"],
                view.limits)])
            if outcome.status != "ok" and not await self._redis.hexists(active, claim_id):
                log.info("standby offer %s refused: %s", claim_id, outcome.status)
                return Refusal(claim_id, outcome.status, outcome.detail)
        booked = False
        refusal = None
        try:
            [claimed] = await self._claims(release_id, [ClaimRequest(
                claim_id=claim_id, account_id=who["account_id"], person_id=person_id,
                slot_id=slot_id, idempotency_key="", birth=int(who["birth"]), sex=who["sex"],
                request_id=who.get("request_id", ""), standby_decline_ms=self._decline_ms)])
            booked = claimed.claim is not None and claimed.claim["claim_id"] == claim_id
            if not booked:
                log.info("standby offer %s refused: %s", claim_id, claimed.status)
                refusal = Refusal(claim_id, claimed.status, claimed.detail)
        finally:
            if not booked:
                await self._persons.unreserve([(person_id, claim_id)])
        return refusal

    async def resume(self, release_id: str, older_than_ms: int, now_ms: int) -> int:
        """Finish handoffs some gateway started and left (it died); returns how many."""
        records = await self._redis.hgetall(keys.handoffs_key(release_id))
        done = 0
        for handoff_id, raw in records.items():
            if orjson.loads(raw)["at_ms"] <= now_ms - older_than_ms:
                await self.hand_on(release_id, reply_text(handoff_id))
                done += 1
        return done


STANDBY_LENGTH = Gauge("release_standby_length", "People on a release's standby list",
                       ["release_id"])


async def resume_handoffs(standby: StandbyList, catalog: ReleaseCatalog,
                          older_than_seconds: float, stopping: asyncio.Event) -> None:
    """Run in every gateway until `stopping`: publish list lengths, finish handoffs left by
    a dead gateway. Several gateways doing it at once is safe: each step is atomic and
    repeatable. Ended by the event, not by cancellation alone, which a redis-py command
    can absorb (see ReleaseCatalog.run)."""
    while not await wait_event(stopping, min(older_than_seconds, 5.0)):
        for release_id in catalog.release_ids():
            try:
                STANDBY_LENGTH.labels(release_id).set(await standby.length(release_id))
                await standby.resume(release_id, int(older_than_seconds * 1000),
                                     catalog.now_ms())
            except (RedisError, LookupError) as exc:
                log.warning("standby handoffs of %s not resumed: %s", release_id, exc)
