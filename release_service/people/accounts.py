"""Accounts and persons: one-time codes by SMS, sessions, family members.

One-time codes live in Redis (5 minutes, single use, 5 wrong tries burn them) and are
limited per phone and per client address; accounts and persons live in PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..core import errors, keys
from ..scripts.client import AnyRedis
from ..scripts.otp import OtpVerifyScript
from ..sms.direct import DirectSms
from .rate_limits import RateLimits
from .resident_id import mask_resident_id, parse_resident_id
from .tokens import PersonGrant

OTP_SECONDS = 300
OTP_TRIES = 5
OTP_COOLDOWN_SECONDS = 60
ACCOUNTS_PER_PHONE = 2
PERSONS_PER_ACCOUNT = 5
PHONE = re.compile(r"^1[3-9][0-9]{9}$")


def check_phone(phone: object) -> str:
    if not isinstance(phone, str) or not PHONE.match(phone):
        raise errors.InvalidInput("phone must be an 11-digit mainland mobile number",
                                  field="phone")
    return phone


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 32 or not name.isprintable():
        raise errors.InvalidInput("real_name must be 1 to 32 printable characters",
                                  field="real_name")
    return name.strip()


class OneTimeCodes:
    def __init__(self, redis: AnyRedis, sms: DirectSms, secret: str,
                 limits: RateLimits) -> None:
        self._redis = redis
        self._limits = limits
        self._sms = sms
        self._secret = secret.encode()
        self._verify = OtpVerifyScript(redis)

    def _digest(self, phone: str, code: str) -> str:
        return hmac.new(self._secret, f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()

    async def send(self, phone: str, client_address: str) -> None:
        code_key, cooldown_key = keys.otp_code_key(phone), keys.otp_cooldown_key(phone)
        await self._limits.check(self._limits.of("otp", "address", client_address),
                                 message="too many codes requested from this address")
        if not await self._redis.set(cooldown_key, 1, nx=True, ex=OTP_COOLDOWN_SECONDS):
            raise errors.RateLimited("a code was sent a moment ago",
                                     retry_after=OTP_COOLDOWN_SECONDS)
        await self._limits.check(self._limits.of("otp", "phone", phone),
                                 message="too many codes for this phone today")
        code = f"{secrets.randbelow(10**6):06d}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(code_key)
        pipe.hset(code_key, mapping={"digest": self._digest(phone, code), "tries": 0})
        pipe.expire(code_key, OTP_SECONDS)
        await pipe.execute()
        # A fresh id per code: the provider's de-duplication must not swallow a resend.
        await self._sms.send_otp(f"otp:{secrets.token_hex(8)}", phone, code)

    async def check(self, phone: str, code: object) -> None:
        if not isinstance(code, str) or not re.fullmatch(r"[0-9]{6}", code):
            raise errors.InvalidInput("code must be 6 digits", field="code")
        result = await self._verify(phone, self._digest(phone, code), OTP_TRIES)
        if result == "ok":
            return
        if result == "burned":
            raise errors.Unauthorized("too many wrong codes; request a new one")
        raise errors.Unauthorized("the code is wrong or expired")


@dataclass(frozen=True, slots=True)
class Person:
    person_id: str
    account_id: str
    real_name: str
    id_number: str
    birth: int
    sex: str
    is_holder: bool

    @property
    def grant(self) -> PersonGrant:
        return PersonGrant(self.person_id, self.birth, self.sex)

    def public(self) -> dict[str, Any]:
        b = str(self.birth)
        return {"person_id": self.person_id, "real_name": self.real_name,
                "id_number": mask_resident_id(self.id_number),
                "birth_date": f"{b[:4]}-{b[4:6]}-{b[6:]}", "sex": self.sex,
                "is_holder": self.is_holder}


def _person(row: Any) -> Person:
    return Person(row["person_id"], row["account_id"], row["real_name"], row["id_number"],
                  int(f"{row['birth_date']:%Y%m%d}"), row["sex"], row["is_holder"])


async def persons_of(conn: Any, account_id: str) -> list[Person]:
    rows = await conn.fetch("SELECT * FROM persons WHERE account_id = $1 "
                            "ORDER BY is_holder DESC, created_at, person_id", account_id)
    return [_person(r) for r in rows]


async def sign_in(pool: asyncpg.Pool, phone: str, real_name: object,
                  id_number: object) -> tuple[str, list[Person], bool]:
    """(account_id, persons, created). Registers the holder when the phone has no account
    for this ID number; a phone backs at most two registered users."""
    async with pool.acquire() as conn, conn.transaction():
        # Serialise sign-ups of one phone: the two-users rule must not race.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", phone)
        holders = await conn.fetch(
            "SELECT a.account_id, p.id_number FROM accounts a JOIN persons p "
            "ON p.account_id = a.account_id AND p.is_holder WHERE a.phone = $1", phone)
        if id_number is None:
            if len(holders) == 1:
                account_id = holders[0]["account_id"]
                return account_id, await persons_of(conn, account_id), False
            if not holders:
                raise errors.InvalidInput("no account for this phone: register with "
                                          "real_name and id_number", field="id_number")
            raise errors.InvalidInput("two users share this phone: give id_number",
                                      field="id_number")
        if not isinstance(id_number, str):
            raise errors.InvalidInput("id_number must be a string", field="id_number")
        resident = parse_resident_id(id_number)
        for holder in holders:
            if holder["id_number"] == resident.number:
                account_id = holder["account_id"]
                return account_id, await persons_of(conn, account_id), False
        if len(holders) >= ACCOUNTS_PER_PHONE:
            raise errors.PhoneLimit(f"a phone number backs at most {ACCOUNTS_PER_PHONE} users")
        name = check_name(real_name)
        account_id = "a_" + secrets.token_hex(8)
        await conn.execute("INSERT INTO accounts (account_id, phone) VALUES ($1, $2)",
                           account_id, phone)
        await conn.execute(
            "INSERT INTO persons (person_id, account_id, real_name, id_number, birth_date, "
            "sex, is_holder) VALUES ($1, $2, $3, $4, $5, $6, true)",
            "p_" + secrets.token_hex(8), account_id, name, resident.number,
            resident.birth_date, resident.sex)
        return account_id, await persons_of(conn, account_id), True


async def add_person(pool: asyncpg.Pool, account_id: str, real_name: object,
                     id_number: object) -> tuple[Person, list[Person]]:
    name = check_name(real_name)
    if not isinstance(id_number, str):
        raise errors.InvalidInput("id_number must be a string", field="id_number")
    resident = parse_resident_id(id_number)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", account_id)
        existing = await persons_of(conn, account_id)
        if not existing:  # an account always holds its holder: this one is gone
            raise errors.Unauthorized("the token's account no longer exists; sign in again")
        if any(p.id_number == resident.number for p in existing):
            raise errors.AlreadyExists("this ID number is already registered on the account")
        if len(existing) >= PERSONS_PER_ACCOUNT:
            raise errors.PersonLimit(f"an account has at most {PERSONS_PER_ACCOUNT} persons")
        person_id = "p_" + secrets.token_hex(8)
        await conn.execute(
            "INSERT INTO persons (person_id, account_id, real_name, id_number, birth_date, sex)"
            " VALUES ($1, $2, $3, $4, $5, $6)", person_id, account_id, name, resident.number,
            resident.birth_date, resident.sex)
        persons = await persons_of(conn, account_id)
    return next(p for p in persons if p.person_id == person_id), persons


async def remove_person(pool: asyncpg.Pool, redis: AnyRedis, account_id: str,
                        person_id: str) -> list[Person]:
    async with pool.acquire() as conn, conn.transaction():
        person = await conn.fetchrow(
            "SELECT * FROM persons WHERE person_id = $1 AND account_id = $2 FOR UPDATE",
            person_id, account_id)
        if person is None:
            raise errors.NotFound("no such person on this account")
        if person["is_holder"]:
            raise errors.Conflict("the account holder cannot be removed")
        # Active bookings: persisted ones, and ones claimed seconds ago (person's Redis slot).
        active = await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE person_id = $1 AND status = 'confirmed'",
            person_id)
        if active or await redis.hlen(keys.person_active_key(person_id)):
            raise errors.HasActiveBooking("this person has an active booking; cancel it first")
        await conn.execute("DELETE FROM persons WHERE person_id = $1", person_id)
        # Tokens issued earlier still name the person: the claim path refuses them from
        # this marker (person ids are never reused). Set before the commit: fail closed.
        await redis.set(keys.person_ban_key(person_id), "removed")
        return await persons_of(conn, account_id)
