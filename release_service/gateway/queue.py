"""The waiting room over HTTP (`mode: queue` releases): join, poll, server-sent events,
and the admission check of the claim.

A resident sees their position and estimated wait; once admitted, the standing carries a
signed admission token that the claim must present (single use, until it expires).
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from ..core import errors
from ..core.metrics import QUEUE_ADMITTED, QUEUE_LENGTH, QUEUE_RETURNED
from ..modes.queue import public_standing
from ..people.tokens import Principal
from ..releases.catalog import ReleaseView
from ..scripts.queue import Standing
from .appkeys import ADMISSION_TOKENS, CATALOG, WAITING_ROOM
from .auth import resident
from .bodies import read_json_object

JSON = "application/json"
EVENT_SECONDS = 1.0
STREAM_SECONDS = 900  # clients reconnect (EventSource does so by itself)
FINAL = frozenset({"used", "expired"})
RELEASE_OVER = frozenset({"sold_out", "closed"})


def _queue_release(request: web.Request) -> ReleaseView:
    release_id = request.match_info["release_id"]
    view = request.app[CATALOG].get(release_id)
    if view is None:
        raise errors.NotFound(f"no release {release_id}")
    if view.document.get("mode") != "queue":
        raise errors.Conflict("this release has no queue (mode is not queue)",
                              mode=view.document.get("mode"))
    return view


def _own_person(principal: Principal, person_id: object) -> str:
    if not isinstance(person_id, str) or person_id not in principal.persons:
        raise errors.NotYourPerson("this account may not queue for that person")
    return person_id


def _observe(release_id: str, standing: Standing) -> None:
    if standing.release:
        QUEUE_LENGTH.labels(release_id).set(standing.waiting)
    if standing.admitted_now:
        QUEUE_ADMITTED.labels(release_id).inc(standing.admitted_now)
    if standing.returned_now:
        QUEUE_RETURNED.labels(release_id).inc(standing.returned_now)


def _body(request: web.Request, release_id: str, person_id: str,
          standing: Standing) -> dict[str, object]:
    if standing.status == "too_early":
        raise errors.NotOpen("the queue is not open yet", opens_at_ms=standing.detail,
                             retry_after=max(1, (standing.detail - standing.now_ms) // 1000))
    if standing.status == "closed":
        raise errors.Closed(f"release {release_id} is closed")
    if standing.status == "sold_out":
        raise errors.SoldOut(f"release {release_id} is sold out")
    if standing.status in ("not_found", "none"):
        raise errors.NotFound("this person is not in the queue")
    _observe(release_id, standing)
    body = {"release_id": release_id, "person_id": person_id, **public_standing(standing)}
    if standing.status == "admitted":
        body["admission_token"] = request.app[ADMISSION_TOKENS].issue(
            release_id, person_id, standing.jti, standing.expires_ms)
        body["admission_expires_at_ms"] = standing.expires_ms
    return body


async def join(request: web.Request) -> web.Response:
    principal = resident(request)  # 401 before anything about the release is told
    view = _queue_release(request)
    person_id = _own_person(principal, (await read_json_object(request)).get("person_id"))
    standing = await request.app[WAITING_ROOM].join(view.release_id, person_id)
    body = _body(request, view.release_id, person_id, standing)
    return web.Response(status=201 if standing.joined else 200,
                        body=orjson.dumps(body), content_type=JSON)


async def poll(request: web.Request) -> web.Response:
    """The polling fallback of the event stream: the same body as one event."""
    principal = resident(request)
    view = _queue_release(request)
    person_id = _own_person(principal, request.match_info["person_id"])
    standing = await request.app[WAITING_ROOM].status(view.release_id, person_id)
    return web.Response(body=orjson.dumps(_body(request, view.release_id, person_id, standing)),
                        content_type=JSON, headers={"Cache-Control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    """`event: standing` whenever it changes (checked every second); the stream ends once
    the admission is used or expired, or the release is sold out or closed."""
    principal = resident(request)
    view = _queue_release(request)
    person_id = _own_person(principal, request.match_info["person_id"])
    room = request.app[WAITING_ROOM]
    first = _body(request, view.release_id, person_id,
                  await room.status(view.release_id, person_id))  # 4xx before streaming
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    body, last = first, b""
    deadline = time.monotonic() + STREAM_SECONDS
    while True:
        data = orjson.dumps(body)
        if data != last:
            await response.write(b"event: standing\ndata: " + data + b"\n\n")
            last = data
        if (body["status"] in FINAL or body["release_status"] in RELEASE_OVER
                or time.monotonic() > deadline):
            return response
        await asyncio.sleep(EVENT_SECONDS)
        body = _body(request, view.release_id, person_id,
                     await room.status(view.release_id, person_id))


def admission_of(request: web.Request, view: ReleaseView, person_id: str,
                 data: dict[str, object]) -> str:
    """The claim's admission in queue mode: the jti of a token signed for this release and
    person (403 without one). Whether it is unused and unexpired is the claim script's
    to check, against Redis's clock, as it spends it."""
    return request.app[ADMISSION_TOKENS].verify(data.get("admission_token"),
                                                view.release_id, person_id)
