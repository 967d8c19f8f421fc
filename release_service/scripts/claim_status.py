"""The typed wrapper of `lua/claim_status.lua`: claims moved from one status to another
(check-in, no-show), one pipeline for all."""

from __future__ import annotations

from collections.abc import Sequence

from ..core import keys
from .client import AnyRedis, pipelined, reply_text
from .source import lua_source


class ClaimStatusScript:
    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        self._script = redis.register_script(lua_source("claim_status.lua"))

    async def __call__(self, claims: Sequence[tuple[str, str]], before: str, after: str
                       ) -> list[str]:
        """Move each (release_id, claim_id) from `before` to `after`. Per claim "ok",
        "missing", or its status when it was not `before` (then left as it is)."""
        replies = await pipelined(self._redis, self._script, (
            ([keys.claims_key(release_id)], [claim_id, before, after])
            for release_id, claim_id in claims))
        return [reply_text(status) for status in replies]
