"""The waiting room of `mode: queue` releases: typed wrappers of lua/queue_*.lua, the
signed admission token, and the opening shuffle repeated in Python for audits.

Every step runs in Redis on the release's slot and advances the room to Redis TIME
(lua/queue_advance.lua), so there is no ticker to elect and nothing to lose when a gateway
process dies: the next call from any process picks up where the last one stopped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..core import keys
from ..core.errors import Forbidden
from ..releases.definition import ReleaseDefinition
from ..scripts.client import AnyRedis, reply_text
from ..scripts.source import lua_source

PARK_MILLER_MODULUS = 2_147_483_647
PARK_MILLER_MULTIPLIER = 48_271
TOKEN_VERSION = "qa1"


def queue_meta(d: ReleaseDefinition) -> dict[str, str | int]:
    """The q_* fields of the release's meta hash (none for other modes). The seed is drawn
    here and kept with the release: the opening shuffle can be replayed from it."""
    if d.mode != "queue":
        return {}
    q = d.queue
    return {
        "q_join_ms": int((d.opens_at.timestamp() - q.join_before_seconds) * 1000),
        "q_factor": repr(q.admit_factor), "q_rate": repr(q.max_admit_per_second),
        "q_token_ms": q.token_seconds * 1000,
        "q_seed": 1 + secrets.randbelow(PARK_MILLER_MODULUS - 1),
        "q_shuffled": 0, "q_head": 0, "q_tail": 0, "q_allow": 0, "q_adv_ms": 0,
    }


def shuffled(pre_queue: Sequence[str], seed: int) -> list[str]:
    """The admission order the opening shuffle gives a pre-queue (join order) and a seed:
    the same Fisher-Yates and generator as lua/queue_advance.lua."""
    order, x = list(pre_queue), seed
    for i in range(len(order), 1, -1):
        x = x * PARK_MILLER_MULTIPLIER % PARK_MILLER_MODULUS
        j = x % i
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


@dataclass(frozen=True, slots=True)
class Standing:
    """One person's place in the room and the room's state, as one script call saw it."""

    status: str  # waiting, admitted, used, expired, none | not_found, not_queue, closed,
    #              too_early
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

    def estimated_wait_seconds(self) -> float | None:
        """Persons ahead over the admission rate: a lower bound (stock limits it too)."""
        if self.status != "waiting" or self.ahead < 0 or self.rate <= 0:
            return None
        return round(self.ahead / self.rate, 1)

    def public(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status,
            "position": self.ahead + 1 if self.ahead >= 0 else None,
            "estimated_wait_seconds": self.estimated_wait_seconds(),
            "release_status": self.release, "remaining": self.left,
            "available": self.available, "waiting": self.waiting,
        }
        if self.next_wave_ms and self.release == "wave_sold_out":
            body["next_wave_at_ms"] = self.next_wave_ms
        return body


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


class WaitingRoom:
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
        pipe = self._redis.pipeline(transaction=False)
        for person_id in person_ids:
            await self._join(keys=_keys(release_id), args=[person_id],
                             client=pipe)  # type: ignore[arg-type]  # a pipeline queues it
        return [_standing(reply) for reply in await pipe.execute()]

    async def status(self, release_id: str, person_id: str = "") -> Standing:
        return _standing(await self._status(keys=_keys(release_id), args=[person_id]))


class AdmissionTokens:
    """`qa1.<payload>.<HMAC-SHA256>`, payload = [release, person, jti, expires_ms]. The
    signature binds it to its release, person and expiry; single use and expiry are
    checked in Redis as the claim spends it (lua/claim.lua)."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"admission-token", hashlib.sha256).digest()

    def _sign(self, body: str) -> str:
        mac = hmac.new(self._key, f"{TOKEN_VERSION}.{body}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def issue(self, release_id: str, person_id: str, jti: str, expires_ms: int) -> str:
        payload = orjson.dumps([release_id, person_id, jti, expires_ms])
        body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        return f"{TOKEN_VERSION}.{body}.{self._sign(body)}"

    def verify(self, token: object, release_id: str, person_id: str) -> str:
        """The jti of a token this service signed for this release and person, or
        Forbidden saying why. Its expiry is the claim script's to check (one clock)."""
        if not isinstance(token, str) or not token.isascii() or token.count(".") != 2:
            raise Forbidden("an admission_token from the queue is required", reason="missing")
        version, body, signature = token.split(".")
        if version != TOKEN_VERSION or not hmac.compare_digest(self._sign(body), signature):
            raise Forbidden("the admission token is invalid", reason="invalid")
        try:
            rid, pid, jti, _expires = orjson.loads(_unpadded_b64(body))
        except (ValueError, TypeError):
            raise Forbidden("the admission token is invalid", reason="invalid") from None
        if rid != release_id or pid != person_id:
            raise Forbidden("the admission token is for another release or person",
                            reason="other")
        return str(jti)


def _unpadded_b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
