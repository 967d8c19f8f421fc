"""The typed wrapper of `lua/restore_claim.lua`: booked claims that Redis lost, written back."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ..core import keys
from .booking_codes import code_keys, seq_for
from .client import AnyRedis
from .source import lua_source

STATUSES = ("present", "restored", "over_capacity", "person_twice")


def restore_keys(release_id: str) -> list[str]:
    queue = keys.queue_keys(release_id)
    return [keys.meta_key(release_id), keys.capacity_key(release_id),
            keys.taken_key(release_id), keys.holders_key(release_id),
            keys.claims_key(release_id), keys.codes_key(release_id),
            *(queue[name] for name in ("who", "live", "jtis"))]


class RestoreScript:
    def __init__(self, redis: AnyRedis, code_secret: str) -> None:
        self._script = redis.register_script(lua_source("restore_claim.lua"))
        self._code_keys = code_keys(code_secret)

    async def __call__(self, release_id: str, events: Sequence[bytes]) -> list[str]:
        """`events`: claim JSON as the claim script writes it. One status per event."""
        if not events:
            return []
        argv: list[str | int | bytes] = [len(events)]
        for event in events:
            argv += [event, seq_for(orjson.loads(event)["code"], self._code_keys)]
        reply = await self._script(keys=restore_keys(release_id), args=argv)
        return [s.decode() if isinstance(s, bytes) else s for s in reply]
