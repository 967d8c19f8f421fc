"""The OpenAPI 3.1 description of the whole HTTP API, served at GET /openapi.json.

Built here rather than kept as a file so that its repeated parts (problem responses,
security, path parameters) are written once; `tests/test_openapi.py` checks that it
names exactly the routes the app serves and fuzzes the live gateway against it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..releases.definition import ReleaseDefinition

JSON = "application/json"
PROBLEM = "application/problem+json"

_TITLES = {
    400: "Malformed request", 401: "Missing or invalid token", 403: "Not allowed",
    404: "Not found", 405: "Method not allowed", 408: "The body arrived too slowly",
    409: "Conflict with the current state",
    410: "The release is closed", 413: "Request body too large",
    415: "Unsupported media type", 422: "Invalid input", 425: "Not open yet or paused",
    429: "Too many requests (Retry-After)", 503: "Overloaded or a backing service is down "
    "(Retry-After)",
}
# Any route may answer these: a malformed request, shedding past the in-flight limit, a
# backing engine down.
_ALWAYS = (400, 405, 503)

_ID = {"type": "string", "minLength": 1, "maxLength": 64}
_CODE = {"type": "string", "pattern": "^[0-9]{8}$"}
_TIME = {"type": "string", "format": "date-time"}
_PHONE = {"type": "string", "pattern": "^1[3-9][0-9]{9}$"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 32}
# The last character is a checksum (GB 11643): a well-formed number can still be refused.
_RESIDENT_ID = {"type": "string", "pattern": "^[0-9]{17}[0-9X]$"}


def _definition_schemas() -> dict[str, Any]:
    """The release definition as its validator states it, so that the two cannot drift."""
    schema = ReleaseDefinition.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs"), "ReleaseDefinition": schema}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_COUNT = {"type": "integer", "minimum": 0}
_BOOKING_STATUS = {"enum": ["confirmed", "cancelled", "attended", "no_show"]}
# Every release answer carries its definition as stored.
_RELEASE_FIELDS = ["release_id", "vaccine", "dose", "clinic_id", "department", "opens_at",
                   "closes_at", "slots", "mode"]
_RELEASE_PROPERTIES = {"release_id": {"type": "string"}, "vaccine": {"type": "string"},
                       "dose": {"type": "integer"}, "clinic_id": {"type": "string"},
                       "department": {"type": "string"}, "opens_at": _TIME,
                       "closes_at": _TIME,
                       "mode": {"enum": ["first_come", "queue", "lottery"]}}


def _slot(*counts: str) -> dict[str, Any]:
    """A slot as answered: its definition, visit day, deadline and stock (`counts` more)."""
    fields = ["capacity", "remaining", *counts]
    return {"type": "object",
            "required": ["slot_id", "starts_at", "ends_at", "visit_day", "cancel_until",
                         *fields],
            "properties": {"slot_id": {"type": "string"}, "starts_at": _TIME,
                           "ends_at": _TIME, "cancel_until": _TIME,
                           "visit_day": {"type": "string", "pattern": "^[0-9]{8}$"},
                           **dict.fromkeys(fields, _COUNT)}}


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object", "required": ["type", "title", "status", "code", "detail"],
        "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                       "status": {"type": "integer"}, "code": {"type": "string"},
                       "detail": {"type": "string"}},
    },
    "Claim": {
        "type": "object",
        "required": ["claim_id", "code", "release_id", "slot_id", "person_id", "status",
                     "claimed_at"],
        "properties": {"claim_id": {"type": "string"}, "code": _CODE,
                       "release_id": {"type": "string"}, "slot_id": {"type": "string"},
                       "person_id": {"type": "string"}, "status": _BOOKING_STATUS,
                       "claimed_at": _TIME},
    },
    "Booking": {
        "type": "object", "required": ["code", "status", "persisted", "claim"],
        "properties": {"code": _CODE, "status": _BOOKING_STATUS,
                       "persisted": {"type": "boolean"}, "claim": _ref("Claim"),
                       "release": {"type": "object", "required": [
                           "release_id", "vaccine", "dose", "clinic_id", "department"]},
                       "slot": {"type": "object", "required": [
                           "slot_id", "starts_at", "ends_at", "cancel_until"]},
                       "cancelled_at": _TIME},
    },
    "Release": {
        "description": "What residents see: the definition, its status and stock.",
        "type": "object", "required": [*_RELEASE_FIELDS, "status", "remaining"],
        "properties": {**_RELEASE_PROPERTIES,
                       "status": {"enum": ["upcoming", "open", "paused", "sold_out",
                                           "closed"]},
                       "remaining": _COUNT,
                       "slots": {"type": "array", "items": _slot()}},
    },
    "AdminRelease": {
        "description": "What operators see: stock per slot, claims, cancellations, outbox.",
        "type": "object",
        "required": [*_RELEASE_FIELDS, "state", "capacity", "remaining", "claimed",
                     "cancelled", "outbox_length", "as_of"],
        "properties": {**_RELEASE_PROPERTIES,
                       "state": {"enum": ["scheduled", "paused", "closed"]},
                       "capacity": _COUNT, "remaining": _COUNT, "claimed": _COUNT,
                       "cancelled": _COUNT, "outbox_length": _COUNT, "as_of": _TIME,
                       "slots": {"type": "array", "items": _slot("claimed", "cancelled")}},
    },
    "StandbyPlace": {
        "type": "object", "required": ["release_id", "length"],
        "properties": {"release_id": {"type": "string"}, "person_id": {"type": "string"},
                       "position": {"type": ["integer", "null"]},
                       "length": {"type": "integer"}, "claim": _ref("Claim"),
                       "decline_until": _TIME,
                       "left": {"type": "object", "required": ["reason", "detail", "left_at"],
                                "properties": {"reason": {"type": "string"},
                                               "detail": {"type": "string"},
                                               "left_at": _TIME}}},
    },
    "LotteryEntry": {
        "type": "object", "required": ["release_id", "person_id", "entry", "draw_at"],
        "properties": {"release_id": {"type": "string"}, "person_id": {"type": "string"},
                       "entry": {"type": "integer", "minimum": 1}, "draw_at": _TIME},
    },
    "LotteryResult": {
        "type": "object", "required": ["release_id", "entries", "state", "draw_at"],
        "properties": {
            "release_id": {"type": "string"}, "entries": {"type": "integer"},
            "state": {"enum": ["open", "drawing", "notifying", "drawn"]}, "draw_at": _TIME,
            "seed_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "committed_at_ms": {"type": "integer"},
            "seed": {"type": "string", "pattern": "^[0-9]+$"},
            "algorithm": {"type": "string"}, "algorithm_text": {"type": "string"},
            "drawn_at_ms": {"type": "integer"},
            "winners": {"type": "array", "items": {"type": "integer"}},
            "skipped": {"type": "array", "items": {"type": "object",
                                                   "required": ["entry", "reason"]}},
        },
    },
    "Standing": {
        "type": "object", "required": ["release_id", "person_id", "status", "release_status"],
        "properties": {
            "release_id": {"type": "string"}, "person_id": {"type": "string"},
            "status": {"enum": ["waiting", "admitted", "used", "expired"]},
            "position": {"type": ["integer", "null"]},
            "estimated_wait_seconds": {"type": ["number", "null"]},
            "release_status": {"enum": ["not_open", "open", "paused", "wave_sold_out",
                                        "sold_out", "closed"]},
            "remaining": {"type": "integer"}, "available": {"type": "integer"},
            "waiting": {"type": "integer"}, "next_wave_at_ms": {"type": "integer"},
            "admission_token": {"type": "string"}, "admission_expires_at_ms": {"type": "integer"},
        },
    },
    "Account": {
        "type": "object", "required": ["account_id", "token", "persons"],
        "properties": {"account_id": {"type": "string"}, "token": {"type": "string"},
                       "persons": {"type": "array", "items": _ref("Person")},
                       "registered": {"type": "boolean"}},
    },
    "Person": {
        "type": "object", "required": ["person_id", "real_name", "id_number"],
        "properties": {"person_id": {"type": "string"}, "real_name": {"type": "string"},
                       "id_number": {"type": "string", "description": "masked"},
                       "birth_date": {"type": "string"}, "sex": {"enum": ["F", "M"]},
                       "is_holder": {"type": "boolean"}},
    },
    **_definition_schemas(),
}


def _responses(success: dict[int, Any], errors: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, body in success.items():
        # A schema means a JSON body; a mapping of media types is used as it is.
        content = body if any("/" in key for key in body) else {JSON: {"schema": body}}
        out[str(status)] = {"description": "OK", **({"content": content} if content else {})}
    for status in sorted(set(errors) | set(_ALWAYS)):
        out[str(status)] = {"description": _TITLES[status],
                            "content": {PROBLEM: {"schema": _ref("Problem")}}}
    return out


# Examples for the parameters and the claim body (the fuzz test creates this release and
# this person, so that generated requests also reach the winning path).
EXAMPLES = {"release_id": "hpv9-wuhou-2026-12", "slot_id": "2026-12-08T09:00",
            "person_id": "p_3f9a1c2e7b4d", "code": "12345678"}
# The contract's example definition (release_id left out: one is generated).
DEFINITION_EXAMPLE = {
    "vaccine": "HPV9", "dose": 1, "clinic_id": "cd-wuhou-01", "department": "vaccination",
    "opens_at": "2026-12-01T10:00:00+08:00", "closes_at": "2026-12-01T22:00:00+08:00",
    "slots": [{"slot_id": "2026-12-08T09:00", "starts_at": "2026-12-08T09:00:00+08:00",
               "ends_at": "2026-12-08T10:00:00+08:00", "capacity": 50}],
    "waves": [{"opens_at": "2026-12-01T10:00:00+08:00", "share": 0.5},
              {"opens_at": "2026-12-01T15:00:00+08:00", "share": 0.5}],
    "eligibility": {"min_age": 9, "max_age": 45, "sex": "F"},
}


def _op(summary: str, success: dict[int, Any], errors: tuple[int, ...] = (), *,
        auth: str | None = None, body: dict[str, Any] | None = None,
        params: tuple[str, ...] = (), headers: tuple[dict[str, Any], ...] = (),
        example: dict[str, Any] | None = None) -> dict[str, Any]:
    # A body may be too large, too slow, or not JSON.
    errors += ((401,) if auth else ()) + ((408, 413, 415) if body is not None else ())
    op: dict[str, Any] = {"summary": summary, "responses": _responses(success, errors)}
    if auth:
        op["security"] = [{auth: []}]
    parameters = [{"name": p, "in": "path", "required": True, "example": EXAMPLES[p],
                   "schema": _CODE if p == "code" else _ID}
                  for p in params]
    parameters += list(headers)
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        media = {"schema": body, **({"example": example} if example else {})}
        op["requestBody"] = {"required": True, "content": {JSON: media}}
    return op


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_LIMITED = (429,)
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "maxLength": 128}}
_BOOKING_ERRORS = (404, 429)
_PERSON_QUERY = {"name": "person_id", "in": "query", "required": False, "schema": _ID}

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {"get": _op("The process is alive", {200: {"type": "object"}})},
    "/readyz": {"get": _op("Redis and Kafka are reachable", {200: {"type": "object"}})},
    "/metrics": {"get": _op("Prometheus metrics", {200: _TEXT})},
    "/openapi.json": {"get": _op("This description", {200: {"type": "object"}})},
    "/ops": {"get": _op("The operations page (HTML)",
                        {200: {"text/html": {"schema": {"type": "string"}}}})},
    "/ops/stream": {"get": _op("Live release figures (server-sent events)", {
        200: {"text/event-stream": {"schema": {"type": "string"}}}}, auth="admin")},
    "/v1/releases": {"get": _op("Open and upcoming releases",
                                {200: {"type": "array", "items": _ref("Release")}})},
    "/v1/releases/{release_id}": {"get": _op(
        "A release with its slots and remaining stock", {200: _ref("Release")}, (404,),
        params=("release_id",))},
    "/v1/releases/{release_id}/claims": {"post": _op(
        "Claim a slot for a person of the account", {201: _ref("Claim")},
        (403, 404, 409, 410, 422, 425, 429), auth="resident",
        params=("release_id",), headers=(_IDEMPOTENCY,),
        body=_obj(["person_id"], person_id=_ID, slot_id=_ID,
                  admission_token={"type": "string", "description": "queue mode"}),
        example={k: EXAMPLES[k] for k in ("person_id", "slot_id")})},
    "/v1/releases/{release_id}/queue": {"post": _op(
        "Join the waiting room of a queue-mode release (one entry per person)",
        {200: _ref("Standing"), 201: _ref("Standing")}, (403, 404, 409, 410, 413, 415, 422, 425),
        auth="resident", params=("release_id",), body=_obj(["person_id"], person_id=_ID))},
    "/v1/releases/{release_id}/queue/{person_id}": {"get": _op(
        "A person's place in the waiting room (the polling form of the events)",
        {200: _ref("Standing")}, (403, 404, 409, 410, 425), auth="resident",
        params=("release_id", "person_id"))},
    "/v1/releases/{release_id}/queue/{person_id}/events": {"get": _op(
        "A person's place in the waiting room as server-sent events (event: standing)",
        {200: {"text/event-stream": {"schema": {"type": "string"}}}},
        (403, 404, 409, 410, 425), auth="resident", params=("release_id", "person_id"))},
    "/v1/otp": {"post": _op(
        "Send a one-time code by SMS", {202: _obj(["sent", "expires_in"])},
        (422, 429), body=_obj(["phone"], phone=_PHONE))},
    "/v1/sessions": {"post": _op(
        "Sign in or register with a one-time code", {200: _ref("Account"),
                                                     201: _ref("Account")},
        (401, 409, 422, 429),
        body=_obj(["phone", "code"], phone=_PHONE,
                  code={"type": "string", "pattern": "^[0-9]{6}$"}, real_name=_NAME,
                  id_number=_RESIDENT_ID))},
    "/v1/persons": {
        "get": _op("The account's persons", {200: {"type": "array",
                                                   "items": _ref("Person")}},
                   auth="resident"),
        "post": _op("Add a family member", {201: _obj(["person", "persons", "token"])},
                    (409, 422), auth="resident",
                    body=_obj(["real_name", "id_number"], real_name=_NAME,
                              id_number=_RESIDENT_ID)),
    },
    "/v1/persons/{person_id}": {"delete": _op(
        "Remove a family member", {200: _obj(["persons", "token"])}, (404, 409),
        auth="resident", params=("person_id",))},
    "/v1/bookings": {"get": _op("The account's bookings",
                                {200: {"type": "array", "items": _ref("Booking")}},
                                _LIMITED, auth="resident")},
    "/v1/bookings/{code}": {"get": _op("One of the account's bookings",
                                       {200: _ref("Booking")}, _BOOKING_ERRORS,
                                       auth="resident", params=("code",))},
    "/v1/bookings/{code}/cancel": {"post": _op(
        "Cancel a booking", {200: _ref("Booking")}, (*_BOOKING_ERRORS, 409),
        auth="resident", params=("code",))},
    "/v1/bookings/{code}/resend-sms": {"post": _op(
        "Send the booking's SMS again", {202: _obj(["code", "resent"])},
        (*_BOOKING_ERRORS, 409), auth="resident", params=("code",))},
    "/v1/bookings/{code}/decline": {"post": _op(
        "Give up a slot handed over from the standby list, within its window",
        {200: _ref("Booking")}, (*_BOOKING_ERRORS, 409), auth="resident", params=("code",))},
    "/v1/releases/{release_id}/standby": {
        "post": _op("Join a sold-out release's standby list", {
            200: _ref("StandbyPlace"), 201: _ref("StandbyPlace")},
            (403, 404, 409, 410, 413, 415, 422, 429), auth="resident",
            params=("release_id",), body=_obj(["person_id"], person_id=_ID)),
        "get": _op("The standby list's length, and a person's place on it",
                   {200: _ref("StandbyPlace")}, (403, 404, 429), auth="resident",
                   params=("release_id",), headers=(_PERSON_QUERY,)),
    },
    "/v1/releases/{release_id}/lottery/entries": {"post": _op(
        "Enter a person in a lottery release's draw", {
            200: _ref("LotteryEntry"), 201: _ref("LotteryEntry")},
        (403, 404, 409, 410, 413, 415, 422, 425, 429), auth="resident",
        params=("release_id",), body=_obj(["person_id"], person_id=_ID))},
    "/v1/releases/{release_id}/lottery": {"get": _op(
        "The lottery's state and seed commitment; once drawn its seed, algorithm, winners",
        {200: _ref("LotteryResult")}, (404, 409), params=("release_id",))},
    "/v1/admin/releases/{release_id}/lottery/draw": {"post": _op(
        "Draw the lottery now (at or after its draw time)", {200: _ref("LotteryResult")},
        (404, 409), auth="admin", params=("release_id",))},
    "/v1/admin/releases": {"post": _op(
        "Create a release and preheat its stock", {201: _ref("AdminRelease")},
        (409, 422), auth="admin", body=_ref("ReleaseDefinition"),
        example=DEFINITION_EXAMPLE)},
    "/v1/admin/releases/{release_id}": {"get": _op(
        "A release with per-slot capacity, remaining, claimed, cancelled",
        {200: _ref("AdminRelease")}, (404,), auth="admin", params=("release_id",))},
    **{f"/v1/admin/releases/{{release_id}}/{action}": {"post": _op(
        f"{action.capitalize()} the release", {200: _ref("AdminRelease")}, (404,),
        auth="admin",
        params=("release_id",))} for action in ("pause", "resume", "close")},
    "/v1/admin/bookings/{code}/check-in": {"post": _op(
        "Mark a booking attended", {200: _ref("Booking")}, (404, 409), auth="admin",
        params=("code",))},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "release-service", "version": "1",
             "description": "Slot releases for vaccine appointments. Errors are RFC 9457 "
                            "problem documents with a stable `code`."},
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "resident": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "admin": {"type": "http", "scheme": "bearer"},
        },
    },
}

_ENCODED = orjson.dumps(DOCUMENT)


async def document(request: web.Request) -> web.Response:
    return web.Response(body=_ENCODED, content_type=JSON)
