"""A whole lottery draw at scale against a running stack, each phase timed.

    .venv/bin/release-service stack up --dir /tmp/lottery-stk
    RELEASE_SERVICE_SETTINGS_FILE=/tmp/lottery-stk/settings.env \\
        .venv/bin/python loadtest/lottery_draw.py --entries 1000000 --slots 1000

Creates a lottery release, enters N people through lua/lottery_enter.lua (pipelined, as
many gateways would), waits for the draw time and runs the draw the gateways run: entries
read, seeded Fisher–Yates, winners booked through claim.lua, one loser event per other
entry appended to the outbox. Redis memory grows by about 250 bytes per entry; the release
stays behind (`stack down` removes it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta

from release_service.core.db import connect_pool
from release_service.core.settings import load_settings
from release_service.modes.lottery import Lottery
from release_service.releases.catalog import ReleaseCatalog
from release_service.releases.definition import parse_definition
from release_service.releases.store import create_release
from release_service.scripts.claim import ClaimScript
from release_service.scripts.client import redis_client
from release_service.scripts.lottery import Entrant, LotteryScripts
from release_service.scripts.reserve import ReserveScript

ENTER_BATCH = 10_000


async def main(entries: int, slots: int, window: float) -> None:
    settings = load_settings()
    redis = redis_client(settings)
    pool = await connect_pool(settings)
    now = datetime.now(UTC)
    day = now + timedelta(days=7)
    rid = f"lottery-bench-{secrets.token_hex(3)}"
    definition = parse_definition({
        "release_id": rid, "vaccine": "HPV9", "dose": 1, "clinic_id": "bench",
        "opens_at": now.isoformat(), "closes_at": (now + timedelta(seconds=window)).isoformat(),
        "mode": "lottery", "slots": [{"slot_id": "s0", "starts_at": day.isoformat(),
                                      "ends_at": (day + timedelta(hours=8)).isoformat(),
                                      "capacity": slots}]})
    await create_release(pool, redis, definition, settings.zone)
    scripts = LotteryScripts(redis)
    started = time.perf_counter()
    accepted = 0
    for first in range(0, entries, ENTER_BATCH):
        entered = await scripts.enter_many(rid, [
            Entrant(f"p{n}", f"a{n}", 19950101, "F")
            for n in range(first, min(entries, first + ENTER_BATCH))])
        accepted += sum(outcome.status == "ok" for outcome in entered)
    print(f"{accepted:,} of {entries:,} entries accepted in "
          f"{time.perf_counter() - started:.1f} s (a longer --window if not all)")

    catalog = ReleaseCatalog(redis, 1.0)
    await catalog.refresh()
    view = catalog.get(rid)
    assert view is not None
    while catalog.now_ms() < view.closes_ms:
        await asyncio.sleep(0.1)
    lottery = Lottery(redis, ClaimScript(redis, settings.code_secret), ReserveScript(redis),
                      catalog, settings.code_secret)
    started = time.perf_counter()
    result = await lottery.draw(rid)
    assert result is not None
    print(f"draw of {result['entries']:,} entries: {len(result['winners']):,} winners, "
          f"{result['entries'] - len(result['winners']):,} told; "
          f"{time.perf_counter() - started:.1f} s")
    await pool.close()
    await redis.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the draw's phases
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--slots", type=int, default=1000)
    parser.add_argument("--window", type=float, default=180.0,
                        help="seconds from creating the release to its draw time")
    args = parser.parse_args()
    asyncio.run(main(args.entries, args.slots, args.window))
