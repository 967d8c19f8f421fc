"""Request bodies: size- and time-limited, JSON objects only, clear 4xx otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ..core.errors import BadRequest, InvalidInput, PayloadTooLarge, RequestTimeout
from .appkeys import SETTINGS

# Longest id a client may send (person, slot, release).
MAX_ID = 64


async def read_json_object(request: web.Request) -> dict[str, Any]:
    seconds = request.app[SETTINGS].body_timeout_seconds
    try:
        if request.content.is_eof():
            # The whole body came with the head (the usual case): reading cannot wait, and
            # arming and cancelling a timer would cost every claim a few microseconds.
            raw = await request.read()  # bounded by client_max_size
        else:
            # A body trickling in would hold one of the in-flight slots the others need.
            async with asyncio.timeout(seconds):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body exceeds {request.app._client_max_size} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {seconds:g} s") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    return data


def text_field(data: dict[str, Any], name: str, required: bool) -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required", field=name)
        return ""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable():
        raise InvalidInput(f"{name} must be a non-empty string of at most {MAX_ID} "
                                  "printable characters", field=name)
    return value
