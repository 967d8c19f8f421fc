"""Redis restarted without its last writes (what an OS crash does under appendfsync
everysec, reproduced by cutting the AOF back while Redis is stopped): claims already booked
in PostgreSQL are written back by the relay's reconcile, so their slots are not sold again
and their codes not issued again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import asyncpg
from support import release_definition, residents
from test_pipeline import Pipeline

from release_service.core import keys

CAPACITY = 20


async def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_booked_claims_lost_by_redis_are_written_back_not_sold_again(
    api, stack, stack_settings, redis, tmp_path
):
    pipeline = Pipeline(stack_settings, tmp_path)
    pipeline.start()
    db = await asyncpg.connect(stack_settings.database_url)
    try:
        release = await api.create_release(release_definition([12, 8]))
        rid = release["release_id"]
        aof = stack.redis_aof_tail()
        before_claims = aof.stat().st_size
        first = residents(stack_settings, CAPACITY)
        answers = await asyncio.gather(*(api.claim(rid, p) for p in first))
        assert [status for status, _, _ in answers] == [201] * CAPACITY
        acknowledged = {body["claim_id"]: body["code"] for _, _, body in answers}

        async def all_booked() -> bool:
            return await db.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1",
                                     rid) == CAPACITY
        assert await wait_until(all_booked)

        # The OS crash: every write since the release was created never reached the disk.
        # The relay stays down meanwhile, so that the loss is seen before it is repaired.
        pipeline.processes["relay"].stop()
        stack.stop("redis", signal.SIGKILL)
        assert stack.redis_aof_tail() == aof
        os.truncate(aof, before_claims)
        stack.start("redis")
        assert await redis.hlen(keys.claims_key(rid)) == 0  # the claims are gone
        pipeline.processes["relay"].start()

        async def written_back() -> bool:
            return await redis.hlen(keys.claims_key(rid)) == CAPACITY
        assert await wait_until(written_back, timeout=15)

        # Nothing of the sold-out release is sold again; nobody of the first claims twice.
        late = residents(stack_settings, 30)
        again = await asyncio.gather(*(api.claim(rid, p) for p in [*late, *first[:5]]))
        statuses = Counter(status for status, _, _ in again)
        assert statuses == {409: 35}, statuses
        # (all "sold_out" once the gateway's view has seen the written-back stock)
        assert {body["code"] for _, _, body in again} <= {"sold_out", "already_claimed"}
        meta = await redis.hgetall(keys.meta_key(rid))
        assert int(meta[b"left"]) == 0
        taken = await redis.hgetall(keys.taken_key(rid))
        assert {k.decode(): int(v) for k, v in taken.items()} == {"s0": 12, "s1": 8}
        # The codes point at their claims again (lookups by code work), and each person's
        # reservation is back (cross-release limits still count the booking).
        codes = await redis.hgetall(keys.codes_key(rid))
        assert {v.decode(): k.decode() for k, v in codes.items()} == acknowledged
        for person in first:
            assert await redis.hlen(keys.person_active_key(person.person_id)) == 1
        rows = await db.fetch("SELECT claim_id, code FROM bookings WHERE release_id = $1", rid)
        assert {r["claim_id"]: r["code"] for r in rows} == acknowledged
    finally:
        await db.close()
        pipeline.stop()
