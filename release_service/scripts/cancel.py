"""The typed wrapper of `lua/cancel.lua`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..core import keys
from .client import AnyRedis
from .replicated import ReplicatedScript
from .source import lua_source


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    # ok, booking_not_found, already_cancelled, not_cancellable, cancel_deadline_passed
    # (detail: the deadline, Unix ms), not_declinable
    status: str
    claim: dict[str, Any] | None = None
    detail: str = ""
    # ok only: the slot is held for the standby list (a handoff named by the claim id)
    # rather than back on sale.
    held_for_standby: bool = False


class CancelScript:
    def __init__(self, redis: AnyRedis, min_replicas: int = 0,
                 replica_timeout_ms: int = 500) -> None:
        self._script = ReplicatedScript(redis, lua_source("cancel.lua"), min_replicas,
                                        replica_timeout_ms)

    async def __call__(self, release_id: str, claim_id: str, account_id: str, *,
                       decline: bool = False) -> CancelOutcome:
        """Cancel, or with `decline` give up a standby booking within its window."""
        reply = await self._script(keys=[
            keys.meta_key(release_id), keys.taken_key(release_id),
            keys.holders_key(release_id), keys.claims_key(release_id),
            keys.outbox_key(release_id), keys.deadline_key(release_id),
            keys.cancelled_key(release_id), keys.standby_key(release_id),
            keys.handoffs_key(release_id),
        ], args=[claim_id, account_id, "decline" if decline else "cancel"])
        status, payload = reply[0].decode(), reply[1]
        if status == "ok":
            return CancelOutcome(status, orjson.loads(payload),
                                 held_for_standby=reply[2] == b"held")
        if status == "already_cancelled":
            return CancelOutcome(status, orjson.loads(payload))
        if status == "not_found":  # the claim: a booking, not a release
            status = "booking_not_found"
        return CancelOutcome(status, None, payload.decode())
