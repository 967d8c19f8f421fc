"""Resident booking endpoints: list, look up by code, cancel, resend the SMS."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from ..bookings.attendance import check_in
from ..bookings.store import Booking, from_row
from ..claims.answers import claim_body, refusal
from ..core import errors, keys
from ..core.timefmt import iso
from .appkeys import (
    BOOKINGS,
    CANCELS,
    CATALOG,
    DATABASE,
    RATE_LIMITS,
    REDIS,
    RESERVE_SCRIPT,
    SETTINGS,
    SMS,
    STANDBY,
)
from .auth import require_admin, resident
from .limits import client_of, limit

log = logging.getLogger(__name__)

JSON = "application/json"
RESENDS_PER_DAY = 3


def booking_body(request: web.Request, booking: Booking) -> dict[str, Any]:
    zone = request.app[SETTINGS].zone
    body: dict[str, Any] = {
        "code": booking.code,
        "status": booking.status,
        "persisted": booking.persisted,
        "claim": claim_body(booking.claim_record(), zone),
    }
    if booking.cancelled_at_ms:
        body["cancelled_at"] = iso(booking.cancelled_at_ms, zone)
    view = request.app[CATALOG].get(booking.release_id)
    if view is not None:
        doc = view.document
        body["release"] = {k: doc[k] for k in ("release_id", "vaccine", "dose", "clinic_id",
                                                "department")}
        slot = next((s for s in doc["slots"] if s["slot_id"] == booking.slot_id), None)
        if slot is not None:
            body["slot"] = {k: slot[k] for k in ("slot_id", "starts_at", "ends_at",
                                                  "cancel_until")}
    return body


async def _own_booking(request: web.Request) -> Booking:
    """The caller's booking with this code. Misses have a small budget of their own (per
    account and per address), so guessing codes stops long before it could pay off."""
    principal = resident(request)
    limits, address = request.app[RATE_LIMITS], client_of(request)
    await limits.check(
        limits.of("lookups", "account", principal.account_id),
        limits.of("lookups", "address", address),
        limits.of("lookup_misses", "account", principal.account_id, cost=0),
        limits.of("lookup_misses", "address", address, cost=0),
        message="too many booking lookups")
    booking = await request.app[BOOKINGS].by_code(request.match_info["code"],
                                                  principal.account_id)
    if booking is None:
        await limits.check(limits.of("lookup_misses", "account", principal.account_id),
                           limits.of("lookup_misses", "address", address),
                           message="too many lookups of codes that are not yours")
        raise errors.NotFound("no booking with this code")
    return booking


async def list_bookings(request: web.Request) -> web.Response:
    principal = resident(request)
    await limit(request, "lookups", principal.account_id, message="too many booking lookups")
    found = await request.app[BOOKINGS].of_account(principal.account_id)
    return web.Response(body=orjson.dumps([booking_body(request, b) for b in found]),
                        content_type=JSON)


async def get_booking(request: web.Request) -> web.Response:
    booking = await _own_booking(request)
    return web.Response(body=orjson.dumps(booking_body(request, booking)), content_type=JSON)


async def cancel_booking(request: web.Request) -> web.Response:
    return await _end_booking(request, decline=False)


async def decline_booking(request: web.Request) -> web.Response:
    """A booking handed over from the standby list, given up within its decline window:
    the slot goes to the next person on the list."""
    return await _end_booking(request, decline=True)


async def _end_booking(request: web.Request, *, decline: bool) -> web.Response:
    booking = await _own_booking(request)
    app = request.app
    outcome = await app[CANCELS](booking.release_id, booking.claim_id, booking.account_id,
                                 decline=decline)
    if outcome.status != "ok":
        raise refusal(outcome.status, outcome.detail, booking.release_id, app[SETTINGS].zone)
    assert outcome.claim is not None
    await app[RESERVE_SCRIPT].unreserve([(booking.person_id, booking.claim_id)])
    if outcome.held_for_standby:
        # The slot goes to the first person on the standby list; back on sale only when
        # nobody there can take it. Left half-way, any gateway's resume finishes it.
        try:
            handed = await app[STANDBY].hand_on(booking.release_id, booking.claim_id)
            returned = handed.status == "returned"
        except (RedisError, LookupError) as exc:
            # The cancellation itself is done and must be answered as done.
            log.warning("standby handoff of %s left to resume: %s", booking.claim_id, exc)
            returned = False
    else:
        returned = True
    if returned:
        # Stock came back: every gateway's sold-out flag must drop now, not at the next poll.
        app[CATALOG].stock_returned(booking.release_id, booking.slot_id)
        await app[REDIS].publish(keys.RELEASE_EVENTS_CHANNEL, booking.release_id)
    cancelled = replace(booking, status="cancelled",
                        cancelled_at_ms=outcome.claim["cancelled_at_ms"])
    return web.Response(body=orjson.dumps(booking_body(request, cancelled)), content_type=JSON)


async def resend_sms(request: web.Request) -> web.Response:
    booking = await _own_booking(request)
    if booking.status != "confirmed":
        raise errors.Conflict(f"the booking is {booking.status}; nothing to resend")
    app = request.app
    counter = f"resend:{{{booking.code}}}:{datetime.now(app[SETTINGS].zone):%Y%m%d}"
    pipe = app[REDIS].pipeline(transaction=True)
    pipe.incr(counter)
    pipe.expire(counter, 86400)
    sent_today, _ = await pipe.execute()
    if sent_today > RESENDS_PER_DAY:
        raise errors.RateLimited(f"at most {RESENDS_PER_DAY} resends a day", retry_after=3600)
    await app[SMS].resend(booking, attempt=sent_today)
    return web.Response(body=orjson.dumps({"code": booking.code, "resent": True}),
                        content_type=JSON, status=202)


async def admin_check_in(request: web.Request) -> web.Response:
    require_admin(request)
    row = await check_in(request.app[DATABASE], request.app[REDIS], request.match_info["code"])
    return web.Response(body=orjson.dumps(booking_body(request, from_row(row))),
                        content_type=JSON)
