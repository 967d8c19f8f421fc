"""Bearer tokens: JWT (HS256) naming the account and the persons it may book for.

Verifying costs no database or Redis call: the persons (id, birth date, sex) travel in the
signed token, which is all the claim path needs for eligibility and `not_your_person`.
A token verified once is remembered (bounded LRU), so a hot client pays the HMAC once;
expiry is still checked on every use. The cache holds plain tuples of strings and ints,
which the garbage collector stops tracking: held as objects, a full cache made every full
collection walk some 260,000 of them (pauses of up to 180 ms measured in a spike).

Tokens are issued by PyJWT. They are verified by a short exact check of the one form
`issue` writes, cross-checked against `jwt.decode` in tests: PyJWT's generic decode costs
~68 µs a token against ~11 µs here, and at the opening second every request carries a
token the gateway has not seen yet.
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
from types import MappingProxyType

import jwt
import orjson

from ..core.errors import Unauthorized
from ..core.settings import SettingsError

AUDIENCE = "release-service"
ISSUER = "release-service"
ALGORITHM = "HS256"
CACHE_SIZE = 65_536
# What the cache keeps of a verified token, flat (a nested tuple is untracked only one
# collection after its contents): account, expiry, then person, birth, sex per grant.
Verified = tuple[str | int, ...]
# RFC 7518 §3.2: an HS256 key has at least 256 bits (PyJWT warns below that).
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class PersonGrant:
    person_id: str
    birth: int  # YYYYMMDD
    sex: str  # "F" or "M"


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    persons: Mapping[str, PersonGrant]  # read-only: cached principals are shared
    expires_at: int  # Unix seconds


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization_header:
        raise Unauthorized("an Authorization: Bearer token is required")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class TokenCodec:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        # SettingsError is a ValueError that the CLI prints as one line.
        if not secret:
            raise SettingsError("RELEASE_SERVICE_TOKEN_SECRET is required (run `release-service "
                                "stack up`, or set it)")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(f"RELEASE_SERVICE_TOKEN_SECRET must be at least "
                                f"{MIN_SECRET_BYTES} bytes for HS256")
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be positive")
        self._secret = secret
        self._ttl = ttl_seconds
        self._verified: OrderedDict[str, Verified] = OrderedDict()
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        # The exact header segment PyJWT writes for HS256: any other header (another
        # algorithm, "none", a key id...) is refused before any parsing.
        self._header = jwt.encode({}, secret, algorithm=ALGORITHM).partition(".")[0]

    def issue(self, account_id: str, persons: Sequence[PersonGrant],
              now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        payload = {
            "sub": account_id,
            "p": [[p.person_id, p.birth, p.sex] for p in persons],
            "exp": issued + self._ttl,
            "iat": issued,
            "aud": AUDIENCE,
            "iss": ISSUER,
        }
        return jwt.encode(payload, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str, now: float | None = None) -> Principal:
        """The token's principal, or Unauthorized. `now` (Unix seconds) is for tests."""
        current = time.time() if now is None else now
        verified = self._verified.get(token)
        if verified is not None:
            if int(verified[1]) <= current:
                del self._verified[token]
                raise Unauthorized("the token has expired")
            self._verified.move_to_end(token)
        else:
            verified = self._verified[token] = self._decode(token, current)
            if len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        grants = {}
        for i in range(2, len(verified), 3):
            person_id = str(verified[i])
            grants[person_id] = PersonGrant(person_id, int(verified[i + 1]), str(verified[i + 2]))
        return Principal(str(verified[0]), MappingProxyType(grants), int(verified[1]))

    def _decode(self, token: str, now: float) -> Verified:
        header, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if header != self._header or not payload or not signature or not token.isascii():
            raise Unauthorized("the token is malformed")
        mac = self._mac.copy()
        mac.update(f"{header}.{payload}".encode())
        # Compare the canonical encoding: a signature with padding, stray characters or a
        # fourth segment never matches (base64 decoding would silently drop those).
        expected = base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
        if not hmac.compare_digest(expected, signature):
            raise Unauthorized("the token signature is invalid")
        try:
            claims = orjson.loads(_b64decode(payload))
        except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
            raise Unauthorized("the token is malformed") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise Unauthorized("the token is malformed")
        if claims.get("aud") != AUDIENCE:
            raise Unauthorized("the token is for another audience")
        if claims.get("iss") != ISSUER:
            raise Unauthorized("the token is from another issuer")
        expires = claims.get("exp")
        if not isinstance(expires, int):
            raise Unauthorized("the token has no expiry")
        if expires <= now:  # the same rule as the cache hit: one clock for both
            raise Unauthorized("the token has expired")
        grants = claims.get("p", [])
        for grant in grants if isinstance(grants, list) else [None]:
            # Signed by us, so always well-formed; checked anyway so a bug cannot 500.
            if not (isinstance(grant, list) and len(grant) == 3 and isinstance(grant[0], str)
                    and isinstance(grant[1], int) and grant[2] in ("F", "M")):
                raise Unauthorized("the token is malformed")
        return (claims["sub"], expires, *(field for grant in grants for field in grant))
