"""The rate limits as the handlers apply them: by account and by client address."""

from __future__ import annotations

from aiohttp import web

from ..people.rate_limits import client_address
from .appkeys import RATE_LIMITS


def client_of(request: web.Request) -> str:
    """The caller's address (through trusted proxies only), worked out once per request."""
    address = request.get("client_address")
    if address is None:
        address = client_address(request.remote, request.headers.get("X-Forwarded-For"),
                                 request.app[RATE_LIMITS].trusted_proxies)
        request["client_address"] = address
    return address


async def limit(request: web.Request, name: str, account_id: str, *, cost: int = 1,
                message: str = "too many requests") -> None:
    """Count one `name` request of this account and this address; 429 past either limit."""
    limits = request.app[RATE_LIMITS]
    await limits.check(limits.of(name, "account", account_id, cost),
                       limits.of(name, "address", client_of(request), cost), message=message)
