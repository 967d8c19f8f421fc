"""What a claim answers: the 201's claim object, and one table from every refusal to its
problem document, whoever found it (this gateway's release view, the person's
reservation, the claim script, the standby and cancel scripts).

A refusal is a status and the script's detail string; the same status gives the same
problem document, with the same fields, from either side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..core import errors
from ..core.timefmt import iso

if TYPE_CHECKING:
    from ..core.settings import Settings
    from ..releases.catalog import ReleaseView

ALREADY_CLAIMED = "this person already holds a claim in this release"
# A view status that this gateway answers itself, as the refusal status it stands for.
LOCAL_STATUS = {"upcoming": "not_open", "closed": "closed", "paused": "paused",
                "sold_out": "sold_out"}
PAUSED_RETRY_SECONDS = 5


def claim_body(claim: dict[str, Any], zone: Any) -> dict[str, Any]:
    """The API's claim object from the script's claim record."""
    return {
        "claim_id": claim["claim_id"],
        "code": claim["code"],
        "release_id": claim["release_id"],
        "slot_id": claim["slot_id"],
        "person_id": claim["person_id"],
        "status": claim["status"],
        "claimed_at": iso(claim["claimed_at_ms"], zone),
    }


def refusal(status: str, detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    """The problem document for a refusal; an unknown status is a 503 to retry."""
    make = _REFUSALS.get(status)
    if make is None:
        return errors.Unavailable(f"claim refused ({status}); try again", retry_after=1)
    return make(detail, release_id, zone)


def seconds_until(ms: int, now_ms: int) -> int:
    """A Retry-After: whole seconds, at least 1."""
    return max(1, math.ceil((ms - now_ms) / 1000))


def _sold_out(detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    if detail:  # the next wave's opening
        return errors.SoldOut("this wave is sold out; more stock opens with the next wave",
                              next_wave_at_ms=int(detail))
    return errors.SoldOut(f"release {release_id} is sold out")


def _not_open(detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    opens_ms = int(detail)
    opens_at = iso(opens_ms, zone)
    return errors.NotOpen(f"opens at {opens_at}", opens_at=opens_at, opens_at_ms=opens_ms)


def _banned(detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    until = datetime.fromtimestamp(int(detail) / 1000, tz=zone)
    return errors.Banned(f"booking is suspended until {until:%Y-%m-%d}",
                         banned_until=until.isoformat())


def _limit_reached(detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    return errors.LimitReached(f"the {detail.replace('_', ' ')} booking limit is reached",
                               limit=detail)


def _cancel_deadline_passed(detail: str, release_id: str, zone: Any) -> errors.ServiceError:
    deadline = iso(int(detail), zone)
    return errors.CancelDeadlinePassed(f"cancellation closed at {deadline}",
                                       cancel_until=deadline)


def _fixed(error: type[errors.ServiceError], message: str, **extra: Any
           ) -> Callable[[str, str, Any], errors.ServiceError]:
    return lambda detail, release_id, zone: error(message.format(release_id=release_id,
                                                                 detail=detail), **extra)


def _with_reason(error: type[errors.ServiceError], message: str
                 ) -> Callable[[str, str, Any], errors.ServiceError]:
    return lambda detail, release_id, zone: error(message.format(detail=detail),
                                                  reason=detail)


_REFUSALS: dict[str, Callable[[str, str, Any], errors.ServiceError]] = {
    # the release
    "not_found": _fixed(errors.NotFound, "no release {release_id}"),
    "not_open": _not_open,
    "paused": _fixed(errors.Paused, "release {release_id} is paused",
                     retry_after=PAUSED_RETRY_SECONDS),
    "closed": _fixed(errors.Closed, "release {release_id} is closed"),
    "sold_out": _sold_out,
    "unknown_slot": _fixed(errors.NotFound, "no such slot in this release", field="slot_id"),
    "not_sold_out": _fixed(errors.NotSoldOut,
                           "the release still has stock: claim a slot instead"),
    # the person
    "already_claimed": _fixed(errors.AlreadyClaimed, ALREADY_CLAIMED),
    "not_eligible": _with_reason(errors.NotEligible, "not eligible for this vaccine ({detail})"),
    "admission": _with_reason(errors.Forbidden, "the admission token is {detail}"),
    "banned": _banned,
    "removed": _fixed(errors.NotYourPerson, "this person was removed from the account"),
    "limit_reached": _limit_reached,
    # the booking
    "booking_not_found": _fixed(errors.NotFound, "no booking with this code"),
    "not_declinable": _fixed(errors.NotDeclinable, "only a booking from the standby list can "
                             "be declined, within its decline window"),
    "already_cancelled": _fixed(errors.AlreadyCancelled, "this booking is already cancelled"),
    "not_cancellable": _fixed(errors.NotCancellable,
                              "a booking that is {detail} cannot be cancelled"),
    "cancel_deadline_passed": _cancel_deadline_passed,
}


def local_refusal(view: ReleaseView, now_ms: int, settings: Settings
                  ) -> tuple[errors.ServiceError, bytes, int | None] | None:
    """The refusal this gateway gives from its release view without asking Redis, with its
    problem document and Retry-After; None when the release is open. During a spike most
    requests get one of these few answers, so each is encoded once per view and status
    (only the wait before the opening changes by the second; the zone, a lookup, is read
    only to build one)."""
    status = view.status(now_ms)
    if status == "open":
        return None
    answer = view.refusal_answers.get(status)
    if answer is None:
        error = refusal(LOCAL_STATUS[status], str(view.opens_ms), view.release_id,
                        settings.zone)
        answer = view.refusal_answers[status] = (error, error.body())
    error, body = answer
    if status == "upcoming":
        return error, body, seconds_until(view.opens_ms, now_ms)
    return error, body, error.retry_after
