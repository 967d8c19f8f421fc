"""Resident ID numbers and bearer tokens: pure, no services."""

from __future__ import annotations

import random
from datetime import date

import jwt
import pytest

from release_service.core.errors import InvalidInput, Unauthorized
from release_service.people.resident_id import (
    generate_resident_id,
    mask_phone,
    mask_resident_id,
    parse_resident_id,
)
from release_service.people.tokens import PersonGrant, TokenCodec, bearer_token


def test_known_valid_number():
    parsed = parse_resident_id("11010519491231002x")
    assert parsed.number == "11010519491231002X"
    assert parsed.birth_date == date(1949, 12, 31) and parsed.sex == "F"
    assert parsed.region == "110105" and parsed.birth == 19491231


def test_generated_numbers_round_trip():
    rng = random.Random(1)
    for sex in ("F", "M"):
        number = generate_resident_id(rng, date(2010, 2, 28), sex)
        parsed = parse_resident_id(number)
        assert parsed.sex == sex and parsed.birth_date == date(2010, 2, 28)


@pytest.mark.parametrize("number", [
    "110105194912310021",  # wrong check character
    "11010519491331002X",  # month 13
    "1101051949123100",  # too short
    "11010519491231002Y",
    "110105 9491231002X",
])
def test_invalid_numbers(number):
    with pytest.raises(InvalidInput):
        parse_resident_id(number)


def test_future_birth_date_is_refused():
    number = generate_resident_id(random.Random(2), date(2030, 1, 1), "F")
    with pytest.raises(InvalidInput):
        parse_resident_id(number, today=date(2026, 11, 23))


def test_masks():
    assert mask_resident_id("11010519491231002X") == "110*************2X"
    assert mask_phone("13812345678") == "138****5678"


SECRET = "a-test-secret-long-enough-for-every-hmac-key-length-" + "x" * 32
CODEC = TokenCodec(SECRET, 3600)
GRANT = PersonGrant("p1", 19950101, "F")


def test_token_round_trip_and_cache():
    token = CODEC.issue("a1", [GRANT])
    principal = CODEC.verify(token)
    assert principal.account_id == "a1" and principal.persons == {"p1": GRANT}
    assert CODEC.verify(token) == principal  # the second use costs no HMAC


def test_expired_token_even_from_the_cache():
    token = CODEC.issue("a1", [GRANT], now=1_000_000)
    assert CODEC.verify(token, now=1_000_100).account_id == "a1"
    with pytest.raises(Unauthorized, match="expired"):
        CODEC.verify(token, now=1_000_000 + 3600)


@pytest.mark.parametrize("token", [
    TokenCodec("another-test-secret-long-enough-for-hs256", 3600).issue("a1", [GRANT]),
    jwt.encode({"sub": "a1", "exp": 4_000_000_000, "aud": "x", "iss": "release-service"},
               SECRET, algorithm="HS256"),
    jwt.encode({"sub": "a1", "exp": 4_000_000_000, "aud": "release-service",
                "iss": "release-service"}, SECRET, algorithm="HS512"),
    "garbage",
])
def test_invalid_tokens(token):
    with pytest.raises(Unauthorized):
        CODEC.verify(token)


def test_tampered_payload():
    header, _payload, signature = CODEC.issue("a1", [GRANT]).split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"a2","exp":4000000000,"aud":"release-service",'
                                        b'"iss":"release-service","p":[["p9",19950101,"F"]]}')
    with pytest.raises(Unauthorized, match="signature"):
        CODEC.verify(f"{header}.{forged.decode()}.{signature}")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer"])
def test_bearer_header(header):
    with pytest.raises(Unauthorized):
        bearer_token(header)
