"""Resident ID numbers (GB 11643-1999) and the masks used in logs: pure, no services."""

from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from release_service.core.errors import InvalidInput
from release_service.people.resident_id import (
    ResidentId,
    check_character,
    generate_resident_id,
    mask_phone,
    mask_resident_id,
    parse_resident_id,
)

TODAY = date(2026, 11, 23)


def with_check(first17: str) -> str:
    """A number whose check character is right, so only what is under test is wrong."""
    return first17 + check_character(first17)


@pytest.mark.parametrize("text", ["11010519491231002X", "11010519491231002x",
                                  " 11010519491231002X\n"])
def test_known_valid_number(text: str) -> None:
    assert parse_resident_id(text) == ResidentId(
        number="11010519491231002X", birth_date=date(1949, 12, 31), sex="F", region="110105")
    assert parse_resident_id(text).birth == 19491231


def test_sex_comes_from_the_17th_digit() -> None:
    male = with_check("51010719900101123")  # 3: odd
    female = with_check("51010719900101124")  # 4: even
    assert parse_resident_id(male).sex == "M"
    assert parse_resident_id(female).sex == "F"
    assert parse_resident_id(male).birth_date == date(1990, 1, 1)


def test_generated_numbers_are_valid() -> None:
    rng = random.Random(7)
    for _ in range(500):
        birth = date(1930, 1, 1) + timedelta(days=rng.randrange(35_000))
        sex = rng.choice("FM")
        number = generate_resident_id(rng, birth, sex, region="440305")
        parsed = parse_resident_id(number, today=TODAY)
        assert (parsed.number, parsed.birth_date, parsed.sex, parsed.region) == (
            number, birth, sex, "440305")


def test_generation_is_reproducible_with_a_seeded_rng() -> None:
    first = [generate_resident_id(random.Random(3), date(2000, 5, 6), "F") for _ in range(3)]
    assert len(set(first)) == 1 and first[0].startswith("51010720000506")


@pytest.mark.parametrize(("sex", "region"), [("X", "510107"), ("f", "510107"),
                                             ("F", "5101"), ("M", "51010a")])
def test_generation_refuses_bad_arguments(sex: str, region: str) -> None:
    with pytest.raises(ValueError):
        generate_resident_id(random.Random(1), date(2000, 1, 1), sex, region)


@pytest.mark.parametrize(("number", "detail"), [
    ("1101051949123100", "18 characters, not 16"),
    ("11010519491231002X1", "18 characters, not 19"),
    ("", "18 characters, not 0"),
    ("11010519491231002Y", "17 digits followed by a digit or X"),
    ("110105 9491231002X", "17 digits followed by a digit or X"),
    ("X10105194912310021", "17 digits followed by a digit or X"),
    ("١١٠١٠٥١٩٤٩١٢٣١٠٠٢X", "17 digits followed by a digit or X"),  # Arabic-Indic digits
    ("110105194912310021", "check character"),
    ("11010519491231003X", "check character"),
])
def test_malformed_numbers(number: str, detail: str) -> None:
    with pytest.raises(InvalidInput, match=detail) as caught:
        parse_resident_id(number)
    assert caught.value.status == 422 and caught.value.extra == {"field": "id_number"}


@pytest.mark.parametrize("first17", [
    "11010519491331002",  # month 13
    "11010519490001002",  # month 0
    "11010519990229002",  # 29 February of a common year
    "11010520000230002",  # 30 February
    "11010519490100002",  # day 0
])
def test_impossible_birth_dates(first17: str) -> None:
    with pytest.raises(InvalidInput, match="impossible birth date"):
        parse_resident_id(with_check(first17))


def test_leap_day_is_a_birth_date() -> None:
    assert parse_resident_id(with_check("11010520000229002")).birth_date == date(2000, 2, 29)


def test_birth_before_1900_is_refused() -> None:
    with pytest.raises(InvalidInput, match="before 1900"):
        parse_resident_id(with_check("11010518991231002"))


def test_future_birth_date_is_refused() -> None:
    tomorrow = generate_resident_id(random.Random(2), TODAY + timedelta(days=1), "F")
    with pytest.raises(InvalidInput, match="in the future"):
        parse_resident_id(tomorrow, today=TODAY)
    born_today = generate_resident_id(random.Random(2), TODAY, "M")
    assert parse_resident_id(born_today, today=TODAY).birth_date == TODAY
    with pytest.raises(InvalidInput, match="in the future"):  # default: today in China
        parse_resident_id(generate_resident_id(random.Random(2), date(2999, 1, 1), "F"))


def test_details_never_repeat_the_number() -> None:
    for number in ("110105194912310021", "11010519491331002X", "51010719900101123Z"):
        with pytest.raises(InvalidInput) as caught:
            parse_resident_id(number)
        assert number[:14] not in caught.value.detail


def test_masks_keep_three_and_two_characters_at_a_fixed_length() -> None:
    assert mask_resident_id("11010519491231002X") == "110*************2X"
    assert mask_resident_id("11010519491231002x") == "110*************2X"
    assert mask_resident_id("510107199001011234") == "510*************34"
    # Anything else is hidden completely, at the same length: no shape leaks.
    assert mask_resident_id("12345") == "*" * 18
    assert mask_resident_id("") == "*" * 18
    assert mask_phone("13812345678") == "138****5678"
    assert mask_phone("+8613812345678") == "*" * 11
    assert mask_phone("") == "*" * 11
