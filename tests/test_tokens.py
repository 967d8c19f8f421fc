"""Bearer tokens: JWT HS256 round trip, every way to be refused, and the verified cache."""

from __future__ import annotations

import base64
import gc
from typing import Any

import jwt
import orjson
import pytest

from release_service.core.errors import Unauthorized
from release_service.people import tokens
from release_service.people.tokens import PersonGrant, TokenCodec, bearer_token

SECRET = "test-token-secret-" + "s" * 64  # long enough for HS512 too (no warning)
OTHER_SECRET = "another-token-secret-" + "o" * 64
TTL = 3600
NOW = 1_800_000_000
HOLDER = PersonGrant("p_holder", 19960101, "F")
CHILD = PersonGrant("p_child", 20200615, "M")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    body = {"sub": "a1", "p": [["p1", 19950101, "F"]], "iat": NOW, "exp": NOW + TTL,
            "aud": "release-service", "iss": "release-service"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
def codec() -> TokenCodec:
    return TokenCodec(SECRET, TTL)


def test_round_trip(codec: TokenCodec) -> None:
    token = codec.issue("a1", [HOLDER, CHILD], now=NOW)
    principal = codec.verify(token, now=NOW + 1)
    assert principal.account_id == "a1"
    assert principal.expires_at == NOW + TTL
    assert dict(principal.persons) == {"p_holder": HOLDER, "p_child": CHILD}
    with pytest.raises(TypeError):  # shared through the cache: read-only
        principal.persons["p_x"] = HOLDER  # type: ignore[index]


def test_compact_payload(codec: TokenCodec) -> None:
    payload = jwt.decode(codec.issue("a1", [HOLDER], now=NOW), SECRET, algorithms=["HS256"],
                         audience="release-service",
                         options={"verify_exp": False, "verify_iat": False})
    assert payload == {"sub": "a1", "p": [["p_holder", 19960101, "F"]], "exp": NOW + TTL,
                       "iat": NOW, "aud": "release-service", "iss": "release-service"}


def test_expired(codec: TokenCodec) -> None:
    token = codec.issue("a1", [HOLDER], now=NOW)
    with pytest.raises(Unauthorized, match="expired"):
        codec.verify(token, now=NOW + TTL)


def test_tampered_payload(codec: TokenCodec) -> None:
    header, _, signature = codec.issue("a1", [HOLDER], now=NOW).split(".")
    forged = b64(orjson.dumps(claims(sub="a2", p=[["p_someone_else", 19950101, "F"]])))
    with pytest.raises(Unauthorized, match="signature"):
        codec.verify(f"{header}.{forged}.{signature}", now=NOW)


def test_wrong_secret(codec: TokenCodec) -> None:
    token = TokenCodec(OTHER_SECRET, TTL).issue("a1", [HOLDER], now=NOW)
    with pytest.raises(Unauthorized, match="signature"):
        codec.verify(token, now=NOW)


def test_wrong_audience_and_issuer(codec: TokenCodec) -> None:
    with pytest.raises(Unauthorized, match="audience"):
        codec.verify(jwt.encode(claims(aud="another-service"), SECRET, algorithm="HS256"),
                     now=NOW)
    with pytest.raises(Unauthorized, match="issuer"):
        codec.verify(jwt.encode(claims(iss="someone"), SECRET, algorithm="HS256"), now=NOW)


@pytest.mark.parametrize("make", [
    lambda: jwt.encode(claims(), SECRET, algorithm="HS512"),  # another algorithm
    lambda: jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "k1"}),
    lambda: jwt.encode(claims(), None, algorithm="none"),  # unsigned
    lambda: jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),  # no expiry
    lambda: jwt.encode(claims(exp="never"), SECRET, algorithm="HS256"),
    lambda: jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
    lambda: jwt.encode(claims(p=[["p1", "1995-01-01", "F"]]), SECRET, algorithm="HS256"),
    lambda: jwt.encode(claims(p=[["p1", 19950101, "X"]]), SECRET, algorithm="HS256"),
    lambda: jwt.encode(claims(p="p1"), SECRET, algorithm="HS256"),
    lambda: "garbage",
    lambda: "",
    lambda: "a.b.c",
    lambda: "é.é.é",
])
def test_refused_tokens(codec: TokenCodec, make: Any) -> None:
    with pytest.raises(Unauthorized):
        codec.verify(make(), now=NOW)


def test_non_canonical_signatures_are_refused(codec: TokenCodec) -> None:
    token = codec.issue("a1", [HOLDER], now=NOW)
    for variant in (token + "=", token + ".", token + ".extra", token + " ", token[:-1]):
        with pytest.raises(Unauthorized):
            codec.verify(variant, now=NOW)


def test_details_never_echo_the_token(codec: TokenCodec) -> None:
    good = codec.issue("a1", [HOLDER], now=NOW)
    for token in (good, good[:-2] + "xx", "garbage.token.value"):
        with pytest.raises(Unauthorized) as caught:
            codec.verify(token, now=NOW + TTL)
        assert token not in caught.value.detail
        assert token.split(".")[-1] not in str(caught.value.problem())


def test_agrees_with_pyjwt(codec: TokenCodec) -> None:
    """The fast verification accepts exactly what PyJWT's full decode accepts."""
    good = codec.issue("a1", [HOLDER], now=NOW)
    header, _payload, signature = good.split(".")
    candidates = [
        good,
        TokenCodec(OTHER_SECRET, TTL).issue("a1", [HOLDER], now=NOW),
        f"{header}.{b64(orjson.dumps(claims(sub='a9')))}.{signature}",
        jwt.encode(claims(aud="x"), SECRET, algorithm="HS256"),
        jwt.encode(claims(iss="x"), SECRET, algorithm="HS256"),
        jwt.encode(claims(exp=NOW - 1), SECRET, algorithm="HS256"),
        jwt.encode(claims(), SECRET, algorithm="HS384"),
        good + ".x",
    ]
    for token in candidates:
        try:  # PyJWT checks expiry against the real clock: compare with NOW instead
            decoded = jwt.decode(token, SECRET, algorithms=["HS256"], audience="release-service",
                                 issuer="release-service",
                                 options={"require": ["exp", "sub", "aud", "iss"],
                                          "verify_exp": False, "verify_iat": False})
            reference = decoded["exp"] > NOW
        except jwt.PyJWTError:
            reference = False
        try:
            codec.verify(token, now=NOW)
            ours = True
        except Unauthorized:
            ours = False
        assert ours == reference, token


def test_cache_pays_the_hmac_once(codec: TokenCodec, monkeypatch: pytest.MonkeyPatch
                                  ) -> None:
    calls = []
    decode = codec._decode
    monkeypatch.setattr(codec, "_decode", lambda t, n: calls.append(t) or decode(t, n))
    token = codec.issue("a1", [HOLDER], now=NOW)
    first = codec.verify(token, now=NOW)
    assert codec.verify(token, now=NOW + 10) == first
    assert len(calls) == 1


def test_cached_tokens_are_not_walked_by_the_garbage_collector(codec: TokenCodec) -> None:
    # A spike fills the cache with tens of thousands of tokens: kept as objects the
    # collector tracks, every full collection walked them all (180 ms pauses).
    tokens = [codec.issue(f"a{i}", [HOLDER, CHILD], now=NOW) for i in range(3)]
    for token in tokens:
        codec.verify(token, now=NOW)
    gc.collect()
    assert not any(gc.is_tracked(codec._verified[token]) for token in tokens)
    assert codec.verify(tokens[0], now=NOW).persons["p_child"] == CHILD


def test_cache_still_rejects_after_expiry(codec: TokenCodec) -> None:
    token = codec.issue("a1", [HOLDER], now=NOW)
    assert codec.verify(token, now=NOW).account_id == "a1"  # now cached
    assert codec.verify(token, now=NOW + TTL - 1).account_id == "a1"
    with pytest.raises(Unauthorized, match="expired"):
        codec.verify(token, now=NOW + TTL)
    with pytest.raises(Unauthorized, match="expired"):  # and again, no longer cached
        codec.verify(token, now=NOW + TTL + 5)


def test_cache_is_bounded(codec: TokenCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "CACHE_SIZE", 3)
    issued = [codec.issue(f"a{i}", [HOLDER], now=NOW) for i in range(5)]
    for token in issued:
        codec.verify(token, now=NOW)
    assert list(codec._verified) == issued[2:]  # least recently used went first
    codec.verify(issued[2], now=NOW)
    codec.verify(issued[0], now=NOW)
    assert list(codec._verified) == [issued[4], issued[2], issued[0]]


@pytest.mark.parametrize("secret", ["", "short-secret"])
def test_secret_must_be_long_enough(secret: str) -> None:
    with pytest.raises(ValueError, match="TOKEN_SECRET"):
        TokenCodec(secret, TTL)


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer abc.def.ghi", "abc.def.ghi"),
    ("  Bearer   abc.def.ghi  ", "abc.def.ghi"),
])
def test_bearer_header(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    "Token abc", "Bearer abc def", "Bearerabc"])
def test_malformed_bearer_header(header: str | None) -> None:
    with pytest.raises(Unauthorized, match="Authorization"):
        bearer_token(header)
