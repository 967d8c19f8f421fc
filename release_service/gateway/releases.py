"""Release endpoints: public reads from the local view, admin writes through PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ..core import keys
from ..core.errors import NotFound
from ..releases.definition import parse_definition
from ..releases.store import admin_view, create_release, set_state
from .appkeys import CATALOG, DATABASE, REDIS, SETTINGS
from .auth import require_admin
from .bodies import read_json_object

JSON = "application/json"


async def list_releases(request: web.Request) -> web.Response:
    return web.Response(body=request.app[CATALOG].list_page, content_type=JSON)


async def get_release(request: web.Request) -> web.Response:
    release_id = request.match_info["release_id"]
    view = request.app[CATALOG].get(release_id)
    if view is None:
        raise NotFound(f"no release {release_id}")
    return web.Response(body=view.page, content_type=JSON)


async def admin_create_release(request: web.Request) -> web.Response:
    require_admin(request)
    definition = parse_definition(await read_json_object(request))
    app = request.app
    await create_release(app[DATABASE], app[REDIS], definition, app[SETTINGS].zone)
    assert definition.release_id is not None
    await app[REDIS].publish(keys.RELEASE_EVENTS_CHANNEL, definition.release_id)
    await app[CATALOG].refresh()  # this gateway's view is current before the admin's reply
    view = await admin_view(app[REDIS], definition.release_id)
    return web.Response(status=201, body=orjson.dumps(view), content_type=JSON,
                        headers={"Location": f"/v1/admin/releases/{definition.release_id}"})


async def admin_get_release(request: web.Request) -> web.Response:
    require_admin(request)
    view = await admin_view(request.app[REDIS], request.match_info["release_id"])
    return web.Response(body=orjson.dumps(view), content_type=JSON)


def _state_change(state: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def change(request: web.Request) -> web.Response:
        require_admin(request)
        release_id = request.match_info["release_id"]
        app = request.app
        await set_state(app[DATABASE], app[REDIS], release_id, state)
        await app[CATALOG].refresh()
        view = await admin_view(app[REDIS], release_id)
        return web.Response(body=orjson.dumps(view), content_type=JSON)

    return change


admin_pause = _state_change("paused")
admin_resume = _state_change("scheduled")
admin_close = _state_change("closed")
