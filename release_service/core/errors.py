"""Domain errors: each carries its HTTP status and stable problem `code` (RFC 9457)."""

from __future__ import annotations

from typing import ClassVar

import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self, detail: str = "", *, retry_after: int | None = None, **extra: object
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after
        self.extra = extra

    def problem(self) -> dict[str, object]:
        body: dict[str, object] = {
            "type": f"https://release-service.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body

    def body(self) -> bytes:
        return orjson.dumps(self.problem())


def _error(name: str, status: int, code: str, title: str) -> type[ServiceError]:
    return type(name, (ServiceError,), {"status": status, "code": code, "title": title})


BadRequest = _error("BadRequest", 400, "bad_request", "Malformed request")
InvalidInput = _error("InvalidInput", 422, "invalid", "Invalid input")
RequestTimeout = _error("RequestTimeout", 408, "request_timeout",
                        "The request body arrived too slowly")
PayloadTooLarge = _error("PayloadTooLarge", 413, "too_large", "Request body too large")
Unauthorized = _error("Unauthorized", 401, "unauthorized", "Missing or invalid token")
Forbidden = _error("Forbidden", 403, "forbidden", "Not allowed")
NotYourPerson = _error("NotYourPerson", 403, "not_your_person",
                       "This account may not book for that person")
NotEligible = _error("NotEligible", 403, "not_eligible", "Not eligible for this vaccine")
Banned = _error("Banned", 403, "banned", "Booking is suspended for this person")
LimitReached = _error("LimitReached", 403, "limit_reached", "A booking limit is reached")
NotFound = _error("NotFound", 404, "not_found", "Not found")
Conflict = _error("Conflict", 409, "conflict", "Conflict")
SoldOut = _error("SoldOut", 409, "sold_out", "Sold out")
AlreadyClaimed = _error("AlreadyClaimed", 409, "already_claimed",
                        "This person already holds a claim in this release")
AlreadyCancelled = _error("AlreadyCancelled", 409, "already_cancelled",
                          "The booking is already cancelled")
NotCancellable = _error("NotCancellable", 409, "not_cancellable",
                        "The booking can no longer be cancelled")
CancelDeadlinePassed = _error("CancelDeadlinePassed", 409, "cancel_deadline_passed",
                              "The cancellation deadline has passed")
NotDeclinable = _error("NotDeclinable", 409, "not_declinable",
                       "Only a standby booking can be declined, within its window")
NotSoldOut = _error("NotSoldOut", 409, "not_sold_out",
                    "The release still has stock: claim a slot instead")
LotteryRelease = _error("LotteryRelease", 409, "lottery_release",
                        "This release is drawn by lottery: enter the lottery instead")
NotLottery = _error("NotLottery", 409, "not_lottery", "This release has no lottery")
EntriesOpen = _error("EntriesOpen", 409, "entries_open",
                     "Lottery entries are open until the draw time")
DrawInProgress = _error("DrawInProgress", 409, "draw_in_progress",
                        "Another process is drawing this lottery")
PhoneLimit = _error("PhoneLimit", 409, "phone_limit", "This phone backs enough users")
PersonLimit = _error("PersonLimit", 409, "person_limit", "The account has enough persons")
HasActiveBooking = _error("HasActiveBooking", 409, "has_active_booking",
                          "The person has an active booking")
AlreadyExists = _error("AlreadyExists", 409, "already_exists", "Already exists")
IdempotencyKeyReused = _error("IdempotencyKeyReused", 422, "idempotency_key_reused",
                              "Idempotency-Key already used for another request")
Closed = _error("Closed", 410, "closed", "The release is closed")
NotOpen = _error("NotOpen", 425, "not_open", "The release is not open yet")
Paused = _error("Paused", 425, "paused", "The release is paused")
RateLimited = _error("RateLimited", 429, "rate_limited", "Too many requests")
Unavailable = _error("Unavailable", 503, "unavailable", "Temporarily unavailable")
# A write the Redis replicas did not confirm in time (redis_min_replicas): not told as done.
ReplicasBehind = _error("ReplicasBehind", 503, "replicas_behind",
                        "The write has not reached enough Redis replicas yet")
