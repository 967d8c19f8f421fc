"""Who is calling: a resident's bearer token (verified without I/O) or the admin token."""

from __future__ import annotations

import hmac

from aiohttp import web

from ..core.errors import Unauthorized
from ..people.tokens import Principal, bearer_token
from .appkeys import SETTINGS, TOKENS


def resident(request: web.Request) -> Principal:
    return request.app[TOKENS].verify(bearer_token(request.headers.get("Authorization")))


def require_admin(request: web.Request) -> None:
    token = bearer_token(request.headers.get("Authorization"))
    expected = request.app[SETTINGS].admin_token
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("an admin token is required")
