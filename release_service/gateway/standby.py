"""The standby list over HTTP: join a sold-out release's list, see one's place in it."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..claims.answers import claim_body, refusal
from ..core import errors
from ..core.timefmt import iso
from .acting_person import acting_person
from .appkeys import CATALOG, SETTINGS, STANDBY
from .auth import resident
from .limits import limit

JSON = "application/json"


def _release_id(request: web.Request) -> str:
    release_id = request.match_info["release_id"]
    if request.app[CATALOG].get(release_id) is None:
        raise errors.NotFound(f"no release {release_id}")
    return release_id


async def join_standby(request: web.Request) -> web.Response:
    principal, person_id, grant = await acting_person(request)  # 401 before anything else
    release_id = _release_id(request)
    place = await request.app[STANDBY].join(release_id, person_id, principal.account_id,
                                            grant.birth, grant.sex, request["request_id"])
    if place.status not in ("ok", "already_listed"):
        raise refusal(place.status, place.detail, release_id, request.app[SETTINGS].zone)
    body = {"release_id": release_id, "person_id": person_id, "position": place.position,
            "length": place.length}
    return web.Response(status=201 if place.status == "ok" else 200,
                        body=orjson.dumps(body), content_type=JSON)


async def get_standby(request: web.Request) -> web.Response:
    """The list's length; with `?person_id=` (one of the caller's persons) also its place
    (`position` null when not on the list), the person's claim in the release, if any
    (with `decline_until` for a slot handed over from the list), and `left` when a slot
    offered to the person was refused by their limits or eligibility."""
    principal = resident(request)
    release_id = _release_id(request)
    await limit(request, "lookups", principal.account_id, message="too many lookups")
    person_id = request.query.get("person_id")
    if person_id is None:
        length = await request.app[STANDBY].length(release_id)
        return web.Response(body=orjson.dumps({"release_id": release_id, "length": length}),
                            content_type=JSON)
    if person_id not in principal.persons:
        raise errors.NotYourPerson("this account may not book for that person")
    place = await request.app[STANDBY].place(release_id, person_id)
    body: dict[str, Any] = {"release_id": release_id, "person_id": person_id,
                            "position": place.position or None, "length": place.length}
    if place.claim is not None:
        body["claim"] = claim_body(place.claim, request.app[SETTINGS].zone)
        if "decline_until_ms" in place.claim:
            body["decline_until"] = iso(place.claim["decline_until_ms"],
                                        request.app[SETTINGS].zone)
    if place.left is not None:
        body["left"] = {"reason": place.left["reason"], "detail": place.left["detail"],
                        "left_at": iso(place.left["at_ms"], request.app[SETTINGS].zone)}
    return web.Response(body=orjson.dumps(body), content_type=JSON)
