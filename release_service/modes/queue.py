"""The waiting room of `mode: queue` releases: its fields in the release's meta, what a
resident is shown of a standing, the signed admission token, and the opening shuffle
repeated in Python for audits.

Every step runs in Redis on the release's slot and advances the room to Redis TIME
(lua/queue_advance.lua, through the wrappers in scripts/queue.py), so there is no ticker
to elect and nothing to lose when a gateway process dies: the next call from any process
picks up where the last one stopped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any

import orjson

from ..core.errors import Forbidden
from ..releases.definition import ReleaseDefinition
from ..scripts.queue import Standing

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


def estimated_wait_seconds(standing: Standing) -> float | None:
    """Persons ahead over the admission rate: a lower bound (stock limits it too)."""
    if standing.status != "waiting" or standing.ahead < 0 or standing.rate <= 0:
        return None
    return round(standing.ahead / standing.rate, 1)


def public_standing(standing: Standing) -> dict[str, Any]:
    """What a resident is shown of their standing (the poll's body, one streamed event)."""
    body: dict[str, Any] = {
        "status": standing.status,
        "position": standing.ahead + 1 if standing.ahead >= 0 else None,
        "estimated_wait_seconds": estimated_wait_seconds(standing),
        "release_status": standing.release, "remaining": standing.left,
        "available": standing.available, "waiting": standing.waiting,
    }
    if standing.next_wave_ms and standing.release == "wave_sold_out":
        body["next_wave_at_ms"] = standing.next_wave_ms
    return body


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
