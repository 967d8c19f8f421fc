"""Lottery releases over HTTP: enter (one entry per person), the published result, and the
operator's draw (the gateways also draw on their own at the draw time)."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..core import errors
from ..modes.lottery import is_lottery
from ..releases.catalog import ReleaseView
from .acting_person import acting_person
from .appkeys import CATALOG, LOTTERY
from .auth import require_admin

JSON = "application/json"


def _lottery_view(request: web.Request) -> ReleaseView:
    release_id = request.match_info["release_id"]
    view = request.app[CATALOG].get(release_id)
    if view is None:
        raise errors.NotFound(f"no release {release_id}")
    if not is_lottery(view):
        raise errors.NotLottery(f"release {release_id} is first come, first served")
    return view


async def enter(request: web.Request) -> web.Response:
    principal, person_id, grant = await acting_person(request)  # 401 before anything else
    view = _lottery_view(request)
    outcome = await request.app[LOTTERY].enter(view.release_id, person_id,
                                               principal.account_id, grant.birth, grant.sex)
    if outcome.status == "not_open":
        raise errors.NotOpen("lottery entries are not open yet",
                             opens_at=view.document["opens_at"])
    if outcome.status == "closed":
        raise errors.Closed("lottery entries are closed")
    if outcome.status == "paused":
        raise errors.Paused("the release is paused", retry_after=5)
    if outcome.status == "not_eligible":
        raise errors.NotEligible(f"not eligible for this vaccine ({outcome.detail})",
                                 reason=outcome.detail)
    if outcome.status == "not_found":
        raise errors.NotFound(f"no release {view.release_id}")
    if outcome.status == "not_lottery":
        raise errors.NotLottery(f"release {view.release_id} has no lottery")
    body = {"release_id": view.release_id, "person_id": person_id, "entry": outcome.number,
            "draw_at": view.document["closes_at"]}
    return web.Response(status=201 if outcome.status == "ok" else 200,
                        body=orjson.dumps(body), content_type=JSON)


async def result(request: web.Request) -> web.Response:
    view = _lottery_view(request)
    body = await request.app[LOTTERY].result(view.release_id)
    body["draw_at"] = view.document["closes_at"]
    return web.Response(body=orjson.dumps(body), content_type=JSON)


async def admin_draw(request: web.Request) -> web.Response:
    require_admin(request)
    view = _lottery_view(request)
    if request.app[CATALOG].now_ms() < view.closes_ms:
        raise errors.EntriesOpen(f"entries are open until {view.document['closes_at']}")
    drawn = await request.app[LOTTERY].draw(view.release_id)
    if drawn is None:
        raise errors.DrawInProgress("another process is drawing this lottery",
                                    retry_after=1)
    drawn["draw_at"] = view.document["closes_at"]
    return web.Response(body=orjson.dumps(drawn), content_type=JSON)
