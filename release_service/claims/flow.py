"""POST /v1/releases/{release_id}/claims: the hot path, top to bottom.

1. `post_claim`: the local checks, cheapest first: the release view (no Redis; refusals
   pre-encoded), then the token (cached HMAC), the rate limits this process knows are
   spent, the body, the person, the queue admission.
2. `_claim`: reserve the person's booking (limits and bans, on the person's own slot),
   then claim (the release's slot); both batched per event-loop tick, one script call each.
3. The day moves: a claim for any slot whose visit day sold out meanwhile follows the stock.
4. `_answer`: the 201, or the refusal's problem document (`answers.refusal`).

No PostgreSQL, and no Redis round trip beyond the two script calls.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import orjson
from aiohttp import web

from ..core import errors, keys
from ..core.errors import ReplicasBehind
from ..core.metrics import claim_result
from ..gateway.appkeys import (
    CATALOG,
    CLAIMS,
    DATABASE,
    RATE_LIMITS,
    REDIS,
    RESERVATIONS,
    SETTINGS,
    UNRESERVE,
)
from ..gateway.auth import resident
from ..gateway.bodies import read_json_object, text_field
from ..gateway.limits import client_of
from ..gateway.middleware import problem_response
from ..gateway.queue import admission_of
from ..modes.lottery import is_lottery
from ..people.tokens import Principal
from ..releases.catalog import ReleaseView
from ..releases.store import add_code_block
from ..scripts.batcher import ONE_BATCH
from ..scripts.claim import ClaimLimit, ClaimOutcome, ClaimRequest
from ..scripts.client import reply_text
from ..scripts.reserve import Reservation, ReserveOutcome
from .answers import claim_body, local_refusal, refusal

MAX_IDEMPOTENCY_KEY = 128
# How long a keyed request waits for a twin (same key, in flight elsewhere) to finish.
TWIN_WAIT_STEPS = 20
TWIN_WAIT_SECONDS = 0.01
NO_REPLAY = ClaimOutcome("no_replay")  # until a replay-only call says otherwise
# How often a claim for any slot follows the stock to another visit day (each move
# re-reserves the person's limits for that day).
DAY_MOVES = 3
# A reservation without its claim this old is no twin's in flight (a claim takes ms).
STALE_RESERVATION_MS = 5000


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise errors.InvalidInput(
            f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


async def post_claim(request: web.Request) -> web.Response:
    app = request.app
    release_id = request.match_info["release_id"]
    idempotency_key = _idempotency_key(request)

    view = app[CATALOG].get(release_id)
    if view is None:
        claim_result("not_found").inc()
        raise errors.NotFound(f"no release {release_id}")
    if is_lottery(view):
        claim_result("lottery_release").inc()
        raise errors.LotteryRelease(
            f"release {release_id} is drawn by lottery: enter at "
            f"/v1/releases/{release_id}/lottery/entries")
    # A keyed request may be the retry of a claim that already won: only the script can
    # tell, so it is never refused locally.
    if not idempotency_key:
        answer = local_refusal(view, app[CATALOG].now_ms(), app[SETTINGS])
        if answer is not None:
            refusal, body, retry_after = answer
            claim_result(refusal.code).inc()
            return problem_response(refusal.status, body, request["request_id"], retry_after)
    # Verified after the local refusals: they tell nothing the public release page does
    # not, and a sold-out spike then costs no HMAC per request.
    principal: Principal = resident(request)
    # Counted by the claim script (no round trip of their own); answered here once spent.
    limits = app[RATE_LIMITS].claim_limits(release_id, principal.account_id,
                                           client_of(request))
    spent = app[RATE_LIMITS].spent(limits)
    if spent is not None:
        claim_result(spent.code).inc()
        raise spent

    data = await read_json_object(request)
    person_id = text_field(data, "person_id", required=True)
    slot_id = text_field(data, "slot_id", required=False)
    grant = principal.persons.get(person_id)
    if grant is None:
        claim_result("not_your_person").inc()
        raise errors.NotYourPerson("this account may not book for that person")

    # Queue mode: the admission from the waiting room, signed for this release and person;
    # the claim script checks it is unused and unexpired and spends it with the claim.
    admission = (admission_of(request, view, person_id, data)
                 if view.document.get("mode") == "queue" else "")
    return await _claim(request, view, principal, person_id, slot_id, idempotency_key,
                        limits, admission)


async def _claim(request: web.Request, view: ReleaseView, principal: Principal,
                 person_id: str, slot_id: str, idempotency_key: str,
                 limits: tuple[ClaimLimit, ...], admission: str) -> web.Response:
    app, release_id = request.app, view.release_id
    grant = principal.persons[person_id]
    day = view.visit_day(slot_id)
    if day is None:
        claim_result("not_found").inc()
        raise errors.NotFound("no such slot in this release", field="slot_id")
    claim_id = os.urandom(12).hex()
    request_base = ClaimRequest(
        claim_id=claim_id, account_id=principal.account_id, person_id=person_id,
        slot_id=slot_id, idempotency_key=idempotency_key, birth=grant.birth, sex=grant.sex,
        day="" if slot_id else day, request_id=request["request_id"], limits=limits,
        admission=admission,
    )
    # Limits and bans span releases: reserve on the person's own slot first.
    doc = view.document
    reservation = Reservation(claim_id, person_id, release_id, day, doc["clinic_id"],
                              doc["department"], view.limits)
    outcome = await _reserve_and_claim(app, request_base, reservation)
    for _ in range(DAY_MOVES):
        if outcome.status != "day_full":
            break
        # Our view of the stock lagged: the day we reserved sold out, another has stock.
        request_base = replace(request_base, day=outcome.detail)
        reservation = replace(reservation, day=outcome.detail)
        outcome = await _reserve_and_claim(app, request_base, reservation)
    return await _answer(app, view, outcome, claim_id, person_id, slot_id, limits)


async def _reserve_and_claim(app: web.Application, request: ClaimRequest,
                             reservation: Reservation) -> ClaimOutcome:
    """Reserve the person's booking (limits and bans), then claim; the reservation is
    removed again unless the claim won. A refused reservation is raised as its 4xx."""
    release_id, claim_id = reservation.release_id, request.claim_id
    reserved = await _reserve(app, reservation, claim_id)
    outcome = NO_REPLAY
    for _ in range(TWIN_WAIT_STEPS if request.idempotency_key else 0):
        if reserved.status == "ok":
            break
        # Refused, perhaps because a twin with this key holds the reservation: its claim
        # is then in flight. Replayed once it lands; reserved anew if the twin gave up.
        outcome = await app[CLAIMS].submit(release_id, replace(request, replay_only=True))
        if outcome.status == "replay" or reserved.status != "already_claimed":
            break
        await asyncio.sleep(TWIN_WAIT_SECONDS)
        reserved = await _reserve(app, reservation, claim_id)
    if reserved.status == "already_claimed" and outcome.status != "replay" and \
            await _stale(app, release_id, reservation.person_id, reserved.held):
        await app[UNRESERVE].submit(ONE_BATCH, (reservation.person_id, reserved.held))
        reserved = await _reserve(app, reservation, claim_id)
    if reserved.status != "ok" and outcome.status != "replay":
        error = refusal(reserved.status, reserved.detail, release_id, app[SETTINGS].zone)
        claim_result(error.code).inc()
        raise error
    if reserved.status == "ok":
        keep = False
        try:
            outcome = await app[CLAIMS].submit(release_id, request)
            keep = outcome.claim is not None and outcome.claim["claim_id"] == claim_id
        except ReplicasBehind:
            # The claim may stand (on the primary, not yet on its replicas): fail closed,
            # so that the keyed retry finds the reservation taken and replays the claim.
            keep = True
            raise
        finally:
            if not keep:  # refused, or failed: the reservation must not count
                await app[UNRESERVE].submit(ONE_BATCH, (reservation.person_id, claim_id))
    return outcome


async def _stale(app: web.Application, release_id: str, person_id: str,
                 reserved_claim_id: str) -> bool:
    """A reservation for this release whose claim the person does not hold there, and too
    old to be a twin's whose claim is in flight: left by an attempt that failed with Redis
    (its unreserve failed too)."""
    if not reserved_claim_id:
        return False
    if await app[REDIS].hget(keys.holders_key(release_id), person_id) is not None:
        return False
    entry = await app[REDIS].hget(keys.person_active_key(person_id), reserved_claim_id)
    if entry is None:
        return True  # gone meanwhile
    reserved_ms = int(reply_text(entry).rsplit("|", 1)[-1])
    return app[CATALOG].now_ms() - reserved_ms > STALE_RESERVATION_MS


async def _reserve(app: web.Application, reservation: Reservation,
                   claim_id: str) -> ReserveOutcome:
    try:
        return await app[RESERVATIONS].submit(ONE_BATCH, reservation)
    except ReplicasBehind:
        # Made, perhaps, but not confirmed, and no claim followed: it must not block the
        # retry (on Redis Cluster the person's shard waits for its own replicas).
        await app[UNRESERVE].submit(ONE_BATCH, (reservation.person_id, claim_id))
        raise


async def _answer(app: web.Application, view: ReleaseView, outcome: ClaimOutcome,
                  claim_id: str, person_id: str, slot_id: str,
                  limits: tuple[ClaimLimit, ...]) -> web.Response:
    """The 201 of a win or a replay; any other outcome raised as its problem document."""
    release_id = view.release_id
    claim = outcome.claim
    # A retried script call (lost reply) finds our own claim: that is a win, not a replay.
    own = claim is not None and claim["claim_id"] == claim_id
    status = "ok" if own else outcome.status

    if status in ("ok", "replay"):
        assert claim is not None
        if status == "replay" and claim["person_id"] != person_id:
            claim_result("idempotency_key_reused").inc()
            raise errors.IdempotencyKeyReused(
                "this Idempotency-Key was used for a claim for another person")
        claim_result("created" if status == "ok" else "replayed").inc()
        headers = {"Location": f"/v1/bookings/{claim['code']}"}
        if status == "replay":
            headers["Idempotent-Replayed"] = "true"
        body = orjson.dumps(claim_body(claim, app[SETTINGS].zone))
        return web.Response(status=201, body=body, content_type="application/json",
                            headers=headers)

    if status == "sold_out" and not outcome.detail and not slot_id:
        app[CATALOG].mark_sold_out(release_id)
    if status == "codes_exhausted":
        await add_code_block(app[DATABASE], app[REDIS], release_id)
    if status == "rate_limited":
        error = app[RATE_LIMITS].claim_refused(limits, outcome.detail)
    else:
        error = refusal(status, outcome.detail, release_id, app[SETTINGS].zone)
    claim_result(error.code).inc()
    raise error


