"""The typed wrapper of `lua/cancel.lua`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from . import keys
from .lua import lua_source
from .redis_client import AnyRedis


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    status: str  # ok, not_found, already_cancelled, not_cancellable, cancel_deadline_passed
    claim: dict[str, Any] | None = None
    detail: str = ""


class CancelScript:
    def __init__(self, redis: AnyRedis) -> None:
        self._script = redis.register_script(lua_source("cancel.lua"))

    async def __call__(self, release_id: str, claim_id: str, account_id: str) -> CancelOutcome:
        status, payload = await self._script(keys=[
            keys.meta_key(release_id), keys.taken_key(release_id),
            keys.holders_key(release_id), keys.claims_key(release_id),
            keys.outbox_key(release_id), keys.deadline_key(release_id),
            keys.cancelled_key(release_id),
        ], args=[claim_id, account_id])
        status = status.decode()
        if status in ("ok", "already_cancelled"):
            return CancelOutcome(status, orjson.loads(payload))
        return CancelOutcome(status, None, payload.decode())
