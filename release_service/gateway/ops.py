"""/ops: a live page for operators, fed by a server-sent event stream of snapshots.

The page is plain HTML and JavaScript served by the gateway (no build step). It reads the
stream with fetch (so the admin token travels in a header, not in the URL) and posts
pause/resume/close to the admin API.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from ..core import keys
from ..core.metrics import CLAIMS
from .appkeys import CATALOG, DATABASE, REDIS
from .auth import require_admin

SNAPSHOT_SECONDS = 0.5
_PAGE = resources.files("release_service.gateway").joinpath("static", "ops.html")


async def page(request: web.Request) -> web.Response:
    # The page itself holds no data; the stream it opens needs the admin token.
    return web.Response(body=_PAGE.read_bytes(), content_type="text/html", charset="utf-8")


def _claim_counts() -> dict[str, float]:
    counts: dict[str, float] = {}
    for metric in CLAIMS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["result"]] = sample.value
    return counts


async def snapshot(app: web.Application) -> dict[str, Any]:
    catalog = app[CATALOG]
    now = catalog.now_ms()
    views = [catalog.get(rid) for rid in catalog.release_ids()]
    releases = [v for v in views if v is not None]
    pipe = app[REDIS].pipeline(transaction=False)
    for view in releases:
        pipe.xlen(keys.outbox_key(view.release_id))
        pipe.zcard(keys.standby_key(view.release_id))
    queued = [v for v in releases if v.document.get("mode") == "queue"]
    for view in queued:  # waiting (before and after the opening) and admitted so far
        q = keys.queue_keys(view.release_id)
        pipe.llen(q["pre"])
        pipe.llen(q["line"])
        pipe.hget(keys.meta_key(view.release_id), "q_head")
    replies = await pipe.execute() if releases else []
    outbox, standby = replies[0:2 * len(releases):2], replies[1:2 * len(releases):2]
    rest = replies[2 * len(releases):]
    queues = {v.release_id: {"waiting": rest[3 * i] + rest[3 * i + 1],
                             "admitted": int(rest[3 * i + 2] or 0)}
              for i, v in enumerate(queued)}
    rows = await app[DATABASE].fetch(
        """SELECT b.release_id, count(*) AS bookings,
                  count(s.claim_id) FILTER (WHERE s.status = 'sent') AS sms_sent
           FROM bookings b
           LEFT JOIN sms_messages s ON s.claim_id = b.claim_id AND s.kind = 'confirmation'
           WHERE b.release_id = ANY($1::text[]) GROUP BY b.release_id""",
        [v.release_id for v in releases])
    persisted = {r["release_id"]: (r["bookings"], r["sms_sent"]) for r in rows}
    return {
        "at": now,
        "claims_by_result": _claim_counts(),
        "releases": [{
            "release_id": v.release_id,
            "vaccine": v.document["vaccine"],
            "clinic_id": v.document["clinic_id"],
            "status": v.status(now),
            "capacity": sum(s["capacity"] for s in v.document["slots"]),
            "remaining": v.left,
            "claimed": sum(s["capacity"] for s in v.document["slots"]) - v.left,
            "slots": [{"slot_id": s["slot_id"], "capacity": s["capacity"],
                       "remaining": v.remaining_by_slot.get(s["slot_id"], 0)}
                      for s in v.document["slots"]],
            "outbox": outbox[i],
            "standby": standby[i],
            "bookings": persisted.get(v.release_id, (0, 0))[0],
            "sms_sent": persisted.get(v.release_id, (0, 0))[1],
            "mode": v.document.get("mode", "first_come"),
            "queue": queues.get(v.release_id),
        } for i, v in enumerate(releases) if v.status(now) != "closed"
            or now - v.closes_ms < 3600_000],
    }


async def stream(request: web.Request) -> web.StreamResponse:
    require_admin(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    deadline = time.monotonic() + 3600  # clients reconnect; no stream lives forever
    while time.monotonic() < deadline:
        data = orjson.dumps(await snapshot(request.app))
        await response.write(b"event: snapshot\ndata: " + data + b"\n\n")
        await asyncio.sleep(SNAPSHOT_SECONDS)
    return response
