"""The typed wrappers of `lua/lottery_enter.lua` (run after `lua/eligibility.lua`) and
`lua/lottery_notify.lua`: lottery entries, and the losers' events once drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..core import keys
from .client import AnyRedis, pipelined, reply_text
from .source import lua_source


class Entrant(NamedTuple):
    person_id: str
    account_id: str
    birth: int  # YYYYMMDD
    sex: str  # F or M


@dataclass(frozen=True, slots=True)
class EnterOutcome:
    status: str  # ok, already_entered, not_open, closed, paused, not_found, not_eligible,
    #              not_lottery
    number: int = 0  # ok, already_entered: the entry number (from 1)
    detail: str = ""  # not_open: opens_ms; not_eligible: "sex" or "age"


def _enter_keys(release_id: str) -> list[str]:
    return [keys.meta_key(release_id), keys.slot_day_key(release_id),
            keys.lottery_entries_key(release_id), keys.lottery_people_key(release_id),
            keys.lottery_result_key(release_id)]


def _entered(reply: list[Any]) -> EnterOutcome:
    status, detail = reply_text(reply[0]), reply_text(reply[1])
    if status in ("ok", "already_entered"):
        return EnterOutcome(status, int(detail))
    return EnterOutcome(status, detail=detail)


class LotteryScripts:
    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        self._enter = redis.register_script(
            lua_source("eligibility.lua") + lua_source("lottery_enter.lua"))
        self._notify = redis.register_script(lua_source("lottery_notify.lua"))

    async def enter(self, release_id: str, entrant: Entrant) -> EnterOutcome:
        return _entered(await self._enter(keys=_enter_keys(release_id), args=entrant))

    async def enter_many(self, release_id: str, entrants: Sequence[Entrant]
                         ) -> list[EnterOutcome]:
        """One entry per entrant, in order, in one pipeline (loads; a single Redis node:
        cluster pipelines carry no scripts)."""
        script_keys = _enter_keys(release_id)
        replies = await pipelined(self._redis, self._enter,
                                  ((script_keys, entrant) for entrant in entrants))
        return [_entered(reply) for reply in replies]

    async def notify(self, release_id: str, first: int, last: int) -> int:
        """Append a `lottery.lost` event for each entry from `first` to `last` (entry
        numbers) that did not win, and mark the range told; the number of events."""
        return int(await self._notify(
            keys=[keys.lottery_entries_key(release_id), keys.lottery_result_key(release_id),
                  keys.outbox_key(release_id)],
            args=[release_id, first, last]))
