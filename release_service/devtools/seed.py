"""`seed-users`: bulk accounts for load tests and demos; `issue-token` for one account.

Every account gets a holder who passes any eligibility a release may ask of an adult
woman (female, 30 today), plus optional family members, and a token naming all of them.
Rows go in with COPY, one transaction per chunk, and a chunk's JSON lines are written only
after its commit: the output never names an account the database lacks.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from ..cli import CommandError
from ..core.db import connect_pool
from ..core.settings import Settings, load_settings
from ..people.resident_id import generate_resident_id
from ..people.tokens import PersonGrant, TokenCodec

CHUNK = 10_000
MAX_FAMILY = 4  # an account holds at most 5 persons
HOLDER_AGE = 30
# One account per phone (the platform allows two): 199 + an 8-digit counter.
PHONE_PREFIX = "199"
PHONE_SPACE = 10**8
# Chengdu's districts and counties: 20 regions x 365 birth days x 500 sequences gives
# 3.65 million distinct numbers for holders.
REGIONS = ("510104", "510105", "510106", "510107", "510108", "510112", "510113", "510114",
           "510115", "510116", "510117", "510118", "510121", "510129", "510131", "510181",
           "510182", "510183", "510184", "510185")
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
GIVEN = "伟芳娜敏静丽强磊洋艳勇军杰娟涛明超秀霞平刚桂英华"
# Serialises concurrent seeders: each continues the phone counter where the last stopped.
_SEED_LOCK = 7_345_113
_PERSON_COLUMNS = ["person_id", "account_id", "real_name", "id_number", "birth_date",
                   "sex", "is_holder"]


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(9)  # 12 URL-safe characters, 72 random bits


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a non-leap year
        return day.replace(year=day.year - years, day=28)


class _People:
    """Draws birth dates, names and distinct resident ID numbers from one seeded RNG."""

    def __init__(self, rng: random.Random, today: date, taken: set[str]) -> None:
        self.rng = rng
        self.today = today
        self._issued = taken  # numbers already in the database, then ours

    def birth(self, age: int) -> date:
        """A birth date making the person exactly `age` today."""
        latest = _years_before(self.today, age)
        return latest - timedelta(days=self.rng.randrange(365))

    def name(self) -> str:
        return self.rng.choice(SURNAMES) + "".join(self.rng.choices(GIVEN, k=2))

    def id_number(self, birth: date, sex: str) -> str:
        for _ in range(1000):
            number = generate_resident_id(self.rng, birth, sex, self.rng.choice(REGIONS))
            if number not in self._issued:
                self._issued.add(number)
                return number
        raise RuntimeError("no distinct resident ID number left for this birth date")

    def family_member(self) -> tuple[int, str]:
        """(age, sex): a child (0-17) or an elderly parent (60-85), either sex."""
        age = self.rng.randint(0, 17) if self.rng.random() < 0.5 else self.rng.randint(60, 85)
        return age, self.rng.choice("FM")


def _chunks(count: int) -> Iterator[int]:
    for start in range(0, count, CHUNK):
        yield min(CHUNK, count - start)


async def _taken_id_numbers(conn: Any) -> set[str]:
    """Every ID number already stored, so reruns stay distinct from earlier runs too (the
    schema only makes a number unique per account). COPY, because it is the cheapest way
    out: about 0.7 s and 100 MB per million persons, fine for a seeding tool."""
    buffer = io.BytesIO()
    await conn.copy_from_query("SELECT id_number FROM persons", output=buffer)
    return set(buffer.getvalue().decode().split())


async def _next_phone_number(conn: Any) -> int:
    """The counter after the highest seeded phone already in the database."""
    highest = await conn.fetchval(
        "SELECT max(phone) FROM accounts WHERE phone BETWEEN $1 AND $2 AND length(phone) = 11",
        f"{PHONE_PREFIX}{0:08d}", f"{PHONE_PREFIX}{PHONE_SPACE - 1:08d}")
    return 0 if highest is None else int(highest[len(PHONE_PREFIX):]) + 1


async def seed_users(settings: Settings, count: int, out: Path, family: int = 0,
                     progress: bool = True, *, rng_seed: int | None = None) -> int:
    """Create `count` accounts (holder + `family` members each), write one JSON line per
    account to `out`: {"account_id", "token", "person_ids"}. Returns the accounts written.
    `rng_seed` makes birth dates, names and ID numbers reproducible on an empty database
    (ids are random; phones continue the database's counter)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    if not 0 <= family <= MAX_FAMILY:
        raise ValueError(f"family must be between 0 and {MAX_FAMILY}")
    codec = TokenCodec(settings.token_secret, settings.token_ttl_seconds)
    pool = await connect_pool(settings, min_size=1, max_size=1)
    bar = tqdm(total=count, unit="user", desc="seed-users", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    written = 0
    try:
        async with pool.acquire() as conn:
            # Held until the connection goes back to the pool (asyncpg's reset unlocks).
            await conn.execute("SELECT pg_advisory_lock($1)", _SEED_LOCK)
            phone = await _next_phone_number(conn)
            if phone + count > PHONE_SPACE:
                raise CommandError(f"only {PHONE_SPACE - phone} seed phone numbers are left")
            people = _People(
                random.Random(secrets.randbits(64) if rng_seed is None else rng_seed),
                datetime.now(settings.zone).date(), await _taken_id_numbers(conn))
            with out.open("wb") as sink:
                # The next chunk is built in a thread while PostgreSQL ingests this one.
                sizes = list(_chunks(count))
                built = asyncio.create_task(asyncio.to_thread(
                    _chunk, codec, people, sizes[0], family, phone))
                try:
                    for index, size in enumerate(sizes):
                        accounts, persons, lines = await built
                        if index + 1 < len(sizes):
                            built = asyncio.create_task(asyncio.to_thread(
                                _chunk, codec, people, sizes[index + 1], family, phone + size))
                        async with conn.transaction():
                            await conn.copy_records_to_table(
                                "accounts", records=accounts, columns=["account_id", "phone"])
                            await conn.copy_records_to_table(
                                "persons", records=persons, columns=_PERSON_COLUMNS)
                        sink.write(b"".join(lines))
                        sink.flush()
                        phone += size
                        written += size
                        bar.update(size)
                finally:
                    built.cancel()
    finally:
        bar.close()
        await pool.close()
    return written


def _chunk(codec: TokenCodec, people: _People, size: int, family: int, first_phone: int
           ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[bytes]]:
    accounts: list[tuple[Any, ...]] = []
    persons: list[tuple[Any, ...]] = []
    lines: list[bytes] = []
    for offset in range(size):
        account_id = _new_id("a_")
        accounts.append((account_id, f"{PHONE_PREFIX}{first_phone + offset:08d}"))
        members = [(HOLDER_AGE, "F")] + [people.family_member() for _ in range(family)]
        grants = []
        for index, (age, sex) in enumerate(members):
            person_id = _new_id("p_")
            birth = people.birth(age)
            persons.append((person_id, account_id, people.name(),
                            people.id_number(birth, sex), birth, sex, index == 0))
            grants.append(PersonGrant(person_id, int(f"{birth:%Y%m%d}"), sex))
        lines.append(orjson.dumps(
            {"account_id": account_id, "token": codec.issue(account_id, grants),
             "person_ids": [g.person_id for g in grants]},
            option=orjson.OPT_APPEND_NEWLINE))
    return accounts, persons, lines


async def load_grants(conn: Any, account_id: str) -> list[PersonGrant]:
    """The account's persons as token grants, holder first; [] for an unknown account."""
    rows = await conn.fetch(
        "SELECT person_id, birth_date, sex FROM persons WHERE account_id = $1 "
        "ORDER BY is_holder DESC, created_at, person_id", account_id)
    return [PersonGrant(r["person_id"], int(f"{r['birth_date']:%Y%m%d}"), r["sex"])
            for r in rows]


def cmd_seed_users(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CommandError("--count must be at least 1")
    if not 0 <= args.family <= MAX_FAMILY:
        raise CommandError(f"--family must be between 0 and {MAX_FAMILY}")
    out = Path(args.out)
    if not out.parent.is_dir():  # else an OSError the CLI would blame on the services
        raise CommandError(f"--out: folder {out.parent} does not exist")
    settings = load_settings()
    started = time.monotonic()
    written = asyncio.run(seed_users(settings, args.count, out, args.family))
    print(f"wrote {written} accounts ({written * (1 + args.family)} persons) to {out} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def cmd_issue_token(args: argparse.Namespace) -> int:
    settings = load_settings()

    async def issue() -> str:
        pool = await connect_pool(settings, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                if not await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = $1)",
                        args.account_id):
                    raise CommandError(f"no account {args.account_id!r}")
                grants = await load_grants(conn, args.account_id)
        finally:
            await pool.close()
        return TokenCodec(settings.token_secret, settings.token_ttl_seconds).issue(
            args.account_id, grants)

    print(asyncio.run(issue()))
    return 0
