"""The typed wrappers of `lua/queue_join.lua` and `lua/queue_status.lua`, each run after
`lua/queue_advance.lua` (the prologue that advances the waiting room to Redis TIME), and
their common reply, a `Standing`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core import keys
from .client import AnyRedis, pipelined, reply_text
from .source import lua_source


@dataclass(frozen=True, slots=True)
class Standing:
    """One person's place in the room and the room's state, as one script call saw it."""

    status: str  # waiting, admitted, used, expired, none | not_found, not_queue, closed,
    #              sold_out, too_early
    ahead: int = -1  # persons admitted before this one; -1 before the opening shuffle
    jti: str = ""
    expires_ms: int = 0
    release: str = ""  # open, not_open, paused, wave_sold_out, sold_out, closed
    available: int = 0  # stock released and not taken
    left: int = 0  # stock not taken, every wave
    next_wave_ms: int = 0
    waiting: int = 0
    admitted_now: int = 0
    returned_now: int = 0
    now_ms: int = 0
    rate: float = 0.0
    admitted_total: int = 0
    detail: int = 0  # too_early: when joining opens (ms)
    joined: bool = False  # this call made the person's entry


def _standing(reply: list[Any]) -> Standing:
    status = reply_text(reply[0])
    if len(reply) < 15:
        return Standing(status, detail=int(reply[1]) if len(reply) > 1 else 0)
    return Standing(
        status, int(reply[1]), reply_text(reply[2]), int(reply[3]), reply_text(reply[4]),
        int(reply[5]), int(reply[6]), int(reply_text(reply[7]) or 0), int(reply[8]), int(reply[9]),
        int(reply[10]), int(reply[11]), float(reply_text(reply[12])), int(reply[13]),
        joined=reply[14] == 1)


def _keys(release_id: str) -> list[str]:
    q = keys.queue_keys(release_id)
    return [keys.meta_key(release_id), keys.capacity_key(release_id),
            keys.taken_key(release_id), q["pre"], q["line"], q["pos"], q["who"], q["live"],
            q["jtis"], keys.outbox_key(release_id), keys.holders_key(release_id)]


class QueueScripts:
    def __init__(self, redis: AnyRedis) -> None:
        prologue = lua_source("queue_advance.lua")
        self._join = redis.register_script(prologue + lua_source("queue_join.lua"))
        self._status = redis.register_script(prologue + lua_source("queue_status.lua"))
        self._redis = redis

    async def join(self, release_id: str, person_id: str) -> Standing:
        return _standing(await self._join(keys=_keys(release_id), args=[person_id]))

    async def join_many(self, release_id: str, person_ids: Sequence[str]) -> list[Standing]:
        """One join per person, in order, in one pipeline (bulk tests and loads; a single
        Redis node: cluster pipelines carry no scripts)."""
        script_keys = _keys(release_id)
        replies = await pipelined(self._redis, self._join,
                                  ((script_keys, [person_id]) for person_id in person_ids))
        return [_standing(reply) for reply in replies]

    async def status(self, release_id: str, person_id: str = "") -> Standing:
        """Advance the room; `person_id` "" for the room's state only."""
        return _standing(await self._status(keys=_keys(release_id), args=[person_id]))
