"""Bearer tokens: JWT (HS256, PyJWT) naming the account and the persons it may book for.

Verifying costs no database or Redis call: the persons (id, birth date, sex) travel in the
signed token, which is what the claim path needs for eligibility and `not_your_person`.
A token verified once is remembered (bounded LRU), so a hot client pays the HMAC once;
expiry is still checked on every use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jwt
import orjson

from .errors import Unauthorized
from .settings import SettingsError

AUDIENCE = "release-service"
ISSUER = "release-service"
CACHE_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class PersonGrant:
    person_id: str
    birth: int  # YYYYMMDD
    sex: str  # "F" or "M"


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    persons: Mapping[str, PersonGrant]
    expires_at: int


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("an Authorization: Bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class TokenCodec:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        if not secret:
            raise SettingsError("RELEASE_SERVICE_TOKEN_SECRET is required (run `release-service "
                                "stack up`, or set it)")
        self._secret = secret
        self._ttl = ttl_seconds
        self._verified: OrderedDict[str, Principal] = OrderedDict()
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        # The header PyJWT writes for HS256; a token with any other header is refused.
        self._header = jwt.encode({}, "k" * 32, algorithm="HS256").split(".")[0]

    def issue(self, account_id: str, persons: Sequence[PersonGrant],
              now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        payload = {
            "sub": account_id,
            "p": [[p.person_id, p.birth, p.sex] for p in persons],
            "iat": issued,
            "exp": issued + self._ttl,
            "aud": AUDIENCE,
            "iss": ISSUER,
        }
        return jwt.encode(payload, self._secret, algorithm="HS256")

    def verify(self, token: str, now: float | None = None) -> Principal:
        current = time.time() if now is None else now
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at <= current:
                del self._verified[token]
                raise Unauthorized("the token has expired")
            self._verified.move_to_end(token)
            return cached
        principal = self._decode(token, current)
        self._verified[token] = principal
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str, now: float) -> Principal:
        """The hot path's verification of our own tokens: exactly the header `issue` writes
        (no algorithm choice left to the token), HMAC-SHA256 compared in constant time,
        then the claims. The same checks PyJWT makes, at a fifth of its cost: the gateway
        verifies every new resident's token once."""
        header, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if header != self._header or not payload or not signature:
            raise Unauthorized("the token is malformed or invalid")
        mac = self._mac.copy()
        mac.update(f"{header}.{payload}".encode())
        try:
            given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            if not hmac.compare_digest(mac.digest(), given):
                raise Unauthorized("the token signature is invalid")
            claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            raise Unauthorized("the token is malformed or invalid") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise Unauthorized("the token is malformed or invalid")
        if claims.get("aud") != AUDIENCE or claims.get("iss") != ISSUER:
            raise Unauthorized("the token is for another audience")
        # Expiry checked here against `now` (one clock for verify and the cache).
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            raise Unauthorized("the token has expired")
        try:
            persons = {
                str(pid): PersonGrant(str(pid), int(birth), str(sex))
                for pid, birth, sex in claims.get("p", [])
            }
        except (TypeError, ValueError):
            raise Unauthorized("the token is malformed or invalid") from None
        return Principal(str(claims["sub"]), persons, int(claims["exp"]))
