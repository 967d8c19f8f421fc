"""The 18-character resident identity number (GB 11643-1999): checksum, birth date, sex."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date

from .errors import InvalidInput

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"  # ISO 7064 MOD 11-2


@dataclass(frozen=True, slots=True)
class ResidentId:
    number: str
    region: str
    birth_date: date
    sex: str  # "F" or "M"

    @property
    def birth(self) -> int:
        """Birth date as YYYYMMDD, the form the claim script compares."""
        return int(self.birth_date.strftime("%Y%m%d"))


def check_character(first17: str) -> str:
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True)) % 11]


def parse_resident_id(text: str, today: date | None = None) -> ResidentId:
    number = text.strip().upper()
    if len(number) != 18 or not number[:17].isdigit() or not (
        number[17].isdigit() or number[17] == "X"
    ):
        raise InvalidInput("a resident ID number has 17 digits and a digit or X",
                           field="id_number")
    if check_character(number[:17]) != number[17]:
        raise InvalidInput("the resident ID number's check character is wrong",
                           field="id_number")
    try:
        birth = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise InvalidInput("the resident ID number holds no valid birth date",
                           field="id_number") from None
    if birth > (today or date.today()) or birth.year < 1890:
        raise InvalidInput("the resident ID number's birth date is impossible",
                           field="id_number")
    sex = "M" if int(number[16]) % 2 else "F"
    return ResidentId(number, number[:6], birth, sex)


def generate_resident_id(rng: random.Random, birth: date, sex: str,
                         region: str = "510107") -> str:
    """A valid number (for seeding and tests): sequence digits drawn from `rng`."""
    order = rng.randrange(0, 500) * 2 + (1 if sex == "M" else 0)
    first17 = f"{region}{birth:%Y%m%d}{order:03d}"
    return first17 + check_character(first17)


def mask_resident_id(text: str) -> str:
    return text[:3] + "*" * 13 + text[-2:] if len(text) == 18 else "*" * len(text)


def mask_phone(text: str) -> str:
    return text[:3] + "****" + text[-4:] if len(text) == 11 else "*" * len(text)
