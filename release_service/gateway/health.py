"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from .appkeys import KAFKA_PROBE, REDIS

_ALIVE = orjson.dumps({"status": "ok"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_ALIVE, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    try:
        redis_ok = bool(await request.app[REDIS].ping())
    except (RedisError, OSError):
        redis_ok = False
    kafka_ok = await request.app[KAFKA_PROBE].reachable()
    ready = redis_ok and kafka_ok
    body = {"status": "ready" if ready else "not_ready",
            "checks": {"redis": "up" if redis_ok else "down",
                       "kafka": "up" if kafka_ok else "down"}}
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body),
                        content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
