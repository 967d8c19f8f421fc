"""The 18-character resident identity number (GB 11643-1999): checksum, birth date, sex.

Layout: 6-digit region code, birth date YYYYMMDD, 3-digit sequence (odd for men, even for
women), check character (ISO 7064 MOD 11-2). Error details never repeat the number: they
end up in responses and logs, and the number is personal data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from ..core.errors import InvalidInput, ServiceError

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"  # indexed by the weighted sum mod 11
# ASCII only: str.isdigit() would also accept e.g. Arabic-Indic or superscript digits.
_SHAPE = re.compile(r"[0-9]{17}[0-9X]")
_REGION = re.compile(r"[0-9]{6}")
# Mainland time (UTC+8, no DST) decides "today", whatever the server's zone: a baby born
# this morning in Chengdu must not have a birth date "in the future" on a UTC host.
_CHINA = timezone(timedelta(hours=8))
MIN_BIRTH_YEAR = 1900  # nobody born earlier is alive to book
LENGTH = 18


@dataclass(frozen=True, slots=True)
class ResidentId:
    number: str  # normalised: upper-case X
    birth_date: date
    sex: str  # "F" or "M"
    region: str  # 6-digit administrative division code

    @property
    def birth(self) -> int:
        """Birth date as YYYYMMDD, the form tokens and the claim script compare."""
        return self.birth_date.year * 10_000 + self.birth_date.month * 100 + self.birth_date.day


def check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of the first 17 digits."""
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True)) % 11]


def _invalid(detail: str) -> ServiceError:
    return InvalidInput(detail, field="id_number")


def parse_resident_id(text: str, today: date | None = None) -> ResidentId:
    """Validate and decode; raises InvalidInput naming what is wrong. `today` defaults to
    the current date in mainland China."""
    if not isinstance(text, str):
        raise _invalid("the resident ID number must be a string")
    number = text.strip().upper()  # lower-case x is common in typed input
    if len(number) != LENGTH:
        raise _invalid(f"a resident ID number has {LENGTH} characters, not {len(number)}")
    if not _SHAPE.fullmatch(number):
        raise _invalid("a resident ID number is 17 digits followed by a digit or X")
    if check_character(number[:17]) != number[17]:
        raise _invalid("the resident ID number's check character does not match "
                       "(mistyped digit?)")
    try:
        birth = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise _invalid("the resident ID number holds an impossible birth date") from None
    if birth.year < MIN_BIRTH_YEAR:
        raise _invalid(f"the resident ID number's birth date is before {MIN_BIRTH_YEAR}")
    if birth > (today or datetime.now(_CHINA).date()):
        raise _invalid("the resident ID number's birth date is in the future")
    sex = "M" if int(number[16]) % 2 else "F"
    return ResidentId(number, birth, sex, number[:6])


def generate_resident_id(rng: random.Random, birth_date: date, sex: str,
                         region: str = "510107") -> str:
    """A valid number for seeding and tests: the sequence is drawn from `rng` (500 choices
    per region, date and sex), with the parity that encodes `sex`."""
    if sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F' or 'M', not {sex!r}")
    if not _REGION.fullmatch(region):
        raise ValueError(f"region must be 6 digits, not {region!r}")
    sequence = rng.randrange(500) * 2 + (1 if sex == "M" else 0)
    first17 = (f"{region}{birth_date.year:04d}{birth_date.month:02d}{birth_date.day:02d}"
               f"{sequence:03d}")
    return first17 + check_character(first17)


def mask_resident_id(text: str) -> str:
    """For logs and screens: "110*************2X". Always 18 characters; anything that is
    not 18 characters long is masked completely (it might be some other secret)."""
    number = text.strip().upper()
    if len(number) != LENGTH:
        return "*" * LENGTH
    return number[:3] + "*" * (LENGTH - 5) + number[-2:]


def mask_phone(text: str) -> str:
    """For logs: "138****5678". Always 11 characters; other lengths are masked completely."""
    phone = text.strip()
    return phone[:3] + "****" + phone[-4:] if len(phone) == 11 else "*" * 11
