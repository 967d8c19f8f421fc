"""`seed-users`: bulk accounts for load tests and demos; `issue-token` for one account."""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from .cli import CommandError
from .db import connect_pool
from .resident_id import generate_resident_id
from .settings import Settings, load_settings
from .tokens import PersonGrant, TokenCodec

CHUNK = 10_000
FAMILY = (("F", 8), ("M", 6), ("F", 62), ("M", 65))  # (sex, age) of extra members


def _years_ago(today: date, years: int, rng: random.Random) -> date:
    return date(today.year - years, rng.randint(1, 12), rng.randint(1, 28))


async def seed_users(settings: Settings, count: int, out: Path, family: int = 0,
                     progress: bool = True) -> int:
    """`count` accounts, each with a holder eligible for every vaccine (a woman of 30) and
    `family` more members; written with COPY in chunks; tokens as JSON lines in `out`."""
    rng = random.Random(secrets.randbits(64))
    codec = TokenCodec(settings.token_secret, settings.token_ttl_seconds)
    today = date.today()
    phone_base = rng.randrange(10**7, 9 * 10**7)
    pool = await connect_pool(settings, max_size=2)
    bar = tqdm(total=count, unit="user", desc="seed-users",
               disable=not (progress and sys.stderr.isatty()))
    try:
        with out.open("wb") as sink:
            for start in range(0, count, CHUNK):
                size = min(CHUNK, count - start)
                accounts: list[tuple[Any, ...]] = []
                persons: list[tuple[Any, ...]] = []
                lines = []
                for i in range(start, start + size):
                    account_id = "a_" + secrets.token_hex(8)
                    accounts.append((account_id, f"199{(phone_base + i) % 10**8:08d}"))
                    members = [("F", 30, True)] + [(s, a, False) for s, a in FAMILY[:family]]
                    grants = []
                    for sex, age, holder in members:
                        person_id = "p_" + secrets.token_hex(8)
                        birth = _years_ago(today, age, rng)
                        persons.append((person_id, account_id, "居民" + person_id[-4:],
                                        generate_resident_id(rng, birth, sex), birth, sex,
                                        holder))
                        grants.append(PersonGrant(person_id, int(f"{birth:%Y%m%d}"), sex))
                    lines.append(orjson.dumps({
                        "account_id": account_id, "token": codec.issue(account_id, grants),
                        "person_ids": [g.person_id for g in grants]}))
                async with pool.acquire() as conn, conn.transaction():
                    await conn.copy_records_to_table(
                        "accounts", records=accounts, columns=["account_id", "phone"])
                    await conn.copy_records_to_table(
                        "persons", records=persons,
                        columns=["person_id", "account_id", "real_name", "id_number",
                                 "birth_date", "sex", "is_holder"])
                sink.write(b"\n".join(lines) + b"\n")
                bar.update(size)
    finally:
        bar.close()
        await pool.close()
    return count


async def load_grants(conn: Any, account_id: str) -> list[PersonGrant]:
    rows = await conn.fetch(
        "SELECT person_id, birth_date, sex FROM persons WHERE account_id = $1 "
        "ORDER BY is_holder DESC, created_at", account_id)
    return [PersonGrant(r["person_id"], int(f"{r['birth_date']:%Y%m%d}"), r["sex"])
            for r in rows]


def cmd_seed_users(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CommandError("--count must be at least 1")
    if not 0 <= args.family <= len(FAMILY):
        raise CommandError(f"--family must be between 0 and {len(FAMILY)}")
    settings = load_settings()
    started = time.monotonic()
    written = asyncio.run(seed_users(settings, args.count, args.out, args.family))
    print(f"wrote {written} accounts to {args.out} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_issue_token(args: argparse.Namespace) -> int:
    settings = load_settings()

    async def issue() -> str:
        pool = await connect_pool(settings, max_size=1)
        try:
            async with pool.acquire() as conn:
                grants = await load_grants(conn, args.account_id)
        finally:
            await pool.close()
        if not grants:
            raise CommandError(f"no account {args.account_id} (or it has no persons)")
        return TokenCodec(settings.token_secret, settings.token_ttl_seconds).issue(
            args.account_id, grants)

    print(asyncio.run(issue()))
    return 0
