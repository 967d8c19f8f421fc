"""Check-in and no-shows: bookings leave the active set, and repeated no-shows ban.

Rules (hospital platform): 3 no-shows in a calendar year ban booking for 3 months, 6 for
6 months, counted in the clinic's time zone; the ban is enforced in the claim path from
Redis (`person:{P}:ban`, which expires when the ban ends) and recorded in PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from datetime import datetime
from typing import Any

import asyncpg

from ..core import errors, keys
from ..core.aio import wait_event
from ..scripts.claim_status import ClaimStatusScript
from ..scripts.client import AnyRedis
from ..scripts.reserve import ReserveScript

log = logging.getLogger(__name__)

BANS = ((6, 6), (3, 3))  # (no-shows in a calendar year, months banned), strictest first


def add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    days = [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31,
            30, 31, 31, 30, 31, 30, 31][month - 1]
    return moment.replace(year=year, month=month, day=min(moment.day, days))


async def _set_claim_status(redis: AnyRedis, rows: list[Any], before: str, after: str) -> None:
    await ClaimStatusScript(redis)([(r["release_id"], r["claim_id"]) for r in rows],
                                   before, after)
    await ReserveScript(redis).unreserve([(r["person_id"], r["claim_id"]) for r in rows])


async def check_in(pool: asyncpg.Pool, redis: AnyRedis, code: str) -> Any:
    row = await pool.fetchrow(
        "UPDATE bookings SET status = 'attended' WHERE code = $1 AND status = 'confirmed' "
        "RETURNING *", code)
    if row is None:
        current = await pool.fetchval("SELECT status FROM bookings WHERE code = $1", code)
        if current is None:
            raise errors.NotFound("no persisted booking with this code")
        raise errors.Conflict(f"the booking is {current}; it cannot be checked in")
    await _set_claim_status(redis, [row], "confirmed", "attended")
    return row


async def no_show_pass(pool: asyncpg.Pool, redis: AnyRedis, now: datetime,
                       zone: Any) -> dict[str, int]:
    """Mark confirmed bookings whose slot ended before `now` as no-shows, then ban the
    persons who reached a threshold this calendar year. Idempotent."""
    async with pool.acquire() as conn, conn.transaction():
        missed = await conn.fetch(
            """UPDATE bookings b SET status = 'no_show'
               FROM slots s
               WHERE s.release_id = b.release_id AND s.slot_id = b.slot_id
                 AND b.status = 'confirmed' AND s.ends_at < $1
               RETURNING b.claim_id, b.person_id, b.release_id""", now)
        persons = sorted({r["person_id"] for r in missed})
        year_start = datetime(now.astimezone(zone).year, 1, 1, tzinfo=zone)
        counts = {r["person_id"]: r["n"] for r in await conn.fetch(
            """SELECT b.person_id, count(*) AS n FROM bookings b
               JOIN slots s ON s.release_id = b.release_id AND s.slot_id = b.slot_id
               WHERE b.person_id = ANY($1::text[]) AND b.status = 'no_show'
                 AND s.starts_at >= $2 AND s.starts_at < $3
               GROUP BY b.person_id""",
            persons, year_start, add_months(year_start, 12))}
        bans: list[tuple[str, datetime, int]] = []
        for person_id, count in counts.items():
            months = next((m for threshold, m in BANS if count >= threshold), 0)
            if months:
                until = add_months(now.astimezone(zone), months)
                bans.append((person_id, until, count))
        if bans:
            await conn.executemany(
                "INSERT INTO bans (person_id, until, no_shows) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING", bans)
    await _set_claim_status(redis, list(missed), "confirmed", "no_show")
    pipe = redis.pipeline(transaction=False)
    for person_id, until, _ in bans:
        until_ms = int(until.timestamp() * 1000)
        # Expires by itself when the ban ends: lifted on time without a job.
        pipe.set(keys.person_ban_key(person_id), until_ms, pxat=until_ms)
    if bans:
        await pipe.execute()
    return {"no_shows": len(missed), "bans": len(bans)}


async def no_shows_forever(pool: asyncpg.Pool, redis: AnyRedis, zone: Any,
                           interval: float, stopping: asyncio.Event) -> None:
    """The timer inside the relay process, until `stopping` (see reconcile_forever)."""
    while not stopping.is_set():
        try:
            result = await no_show_pass(pool, redis, datetime.now(zone), zone)
            if result["no_shows"]:
                log.info("no-show pass: %(no_shows)d no-shows, %(bans)d bans", result)
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("no-show pass failed: %s", exc)
        await wait_event(stopping, interval)


def cmd_no_shows(args: argparse.Namespace) -> int:
    from ..core.db import connect_pool
    from ..core.settings import load_settings
    from ..scripts.client import check_topology, redis_client

    settings = load_settings()
    now = datetime.fromisoformat(args.now) if args.now else datetime.now(settings.zone)
    if now.tzinfo is None:
        now = now.replace(tzinfo=settings.zone)

    async def run() -> dict[str, int]:
        await check_topology(settings)
        pool = await connect_pool(settings, max_size=2)
        redis = redis_client(settings)
        try:
            return await no_show_pass(pool, redis, now, settings.zone)
        finally:
            await pool.close()
            await redis.aclose()

    result = asyncio.run(run())
    print(f"no-shows marked: {result['no_shows']}; bans issued: {result['bans']}")
    return 0
