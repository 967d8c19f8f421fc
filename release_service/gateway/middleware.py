"""Request middleware: admission, request ids, metrics, and errors turned into problem
documents."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.errors import PROBLEM_CONTENT_TYPE, NotFound, ServiceError, Unavailable
from ..core.metrics import HTTP

log = logging.getLogger("release_service.gateway")

# Failures of a backing engine, not of the request: 503 with Retry-After. A claim whose
# reply was lost this way is not acknowledged; a retry with its Idempotency-Key replays it.
ENGINE_DOWN = (RedisConnectionError, RedisTimeoutError, asyncpg.PostgresConnectionError,
               asyncpg.CannotConnectNowError, asyncpg.InterfaceError, OSError)

# Replies of a Redis node in a failover: a primary without the replicas it needs
# (min-replicas-to-write), a node demoted to replica, a Cluster shard without a primary.
FAILOVER_REPLIES = ("NOREPLICAS", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")


def engine_down(exc: BaseException) -> bool:
    return isinstance(exc, ENGINE_DOWN) or (
        isinstance(exc, RedisResponseError) and str(exc).startswith(FAILOVER_REPLIES))


REQUEST_ID_HEADER = "X-Request-Id"
# Request ids: unique per process start, cheap to make (no syscall per request).
_ID_PREFIX = secrets.token_hex(4)
_request_numbers = itertools.count(1)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
    431: "headers_too_large",
}


def problem_response(
    status: int, body: bytes, request_id: str, retry_after: int | None = None
) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(status=status, body=body, content_type=PROBLEM_CONTENT_TYPE,
                        headers=headers)


def _http_problem(exc: web.HTTPException) -> bytes:
    code = _HTTP_CODES.get(exc.status, "http_error")
    body: dict[str, Any] = {
        "type": f"https://release-service.dev/problems/{code}", "title": exc.reason,
        "status": exc.status, "code": code, "detail": exc.reason,
    }
    return orjson.dumps(body)


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


# No id the service hands out is longer or holds a control character; PostgreSQL would
# refuse text with NUL, so such a path is answered here as the 404 it is.
MAX_PATH_ID = 128


def _check_path_ids(request: web.Request) -> None:
    for name, value in request.match_info.items():
        if len(value) > MAX_PATH_ID or not value.isprintable():
            raise NotFound(f"no such {name.replace('_', ' ')}")


_NOT_COUNTED = frozenset({"/healthz", "/readyz", "/metrics"})


def gateway_middleware(limit: int) -> Any:
    """The gateway's one middleware (each layer costs every request a coroutine):
    admission first — past `limit` requests in flight a 503 at once, before any work —
    then request ids and metrics; every failure leaves as an RFC 9457 document and an
    unexpected one is logged once, with the request id and without the body (it may
    carry ID numbers)."""
    overloaded = ServiceError("the gateway is at capacity; retry shortly")
    shed_body = orjson.dumps({**overloaded.problem(), "status": 503, "code": "overloaded",
                              "title": "Overloaded"})
    in_flight = 0

    @web.middleware
    async def gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        counted = request.path not in _NOT_COUNTED
        if counted:
            if in_flight >= limit:
                HTTP.count("overloaded", 503)
                return problem_response(503, shed_body, "", retry_after=1)
            in_flight += 1
        request_id = request.headers.get(REQUEST_ID_HEADER, "")[:64] or \
            f"{_ID_PREFIX}-{next(_request_numbers):x}"
        request["request_id"] = request_id
        started = time.perf_counter()
        try:
            _check_path_ids(request)
            response = await handler(request)
            response.headers[REQUEST_ID_HEADER] = request_id
        except ServiceError as exc:
            response = problem_response(exc.status, exc.body(), request_id, exc.retry_after)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = problem_response(exc.status, _http_problem(exc), request_id)
            if "Allow" in exc.headers:  # a 405 names the methods the path has (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception as exc:
            if engine_down(exc):  # Redis or PostgreSQL unreachable, restarting, failing over
                log.warning("%s %s (request %s): engine unavailable: %s", request.method,
                            _route_name(request), request_id, type(exc).__name__)
                failure = Unavailable("a backing service is unavailable; try again shortly",
                                      retry_after=1)
                response = problem_response(503, failure.body(), request_id,
                                            failure.retry_after)
            else:
                log.exception("unhandled error on %s %s (request %s)",
                              request.method, _route_name(request), request_id)
                failure = ServiceError("unexpected error; quote the request id",
                                       request_id=request_id)
                response = problem_response(500, failure.body(), request_id)
        finally:
            if counted:
                in_flight -= 1
        route = _route_name(request)
        HTTP.observe(route, response.status, time.perf_counter() - started)
        return response

    return gateway
