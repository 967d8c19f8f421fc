"""Request bodies: size-limited, JSON objects only, clear 4xx otherwise."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import BadRequest, InvalidInput, PayloadTooLarge


async def read_json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()  # bounded by client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body exceeds {request.app._client_max_size} bytes") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    return data
