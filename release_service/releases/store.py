"""Releases: create (PostgreSQL first, then preheat Redis), state changes, admin view.

PostgreSQL is the system of record for the definition; Redis holds everything the claim
path needs, written at preheat, so a claim never touches PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from ..core import keys
from ..core.errors import AlreadyExists, Conflict, NotFound
from ..modes.lottery_draw import commit_seed
from ..modes.queue import queue_meta
from ..scripts.client import AnyRedis
from .definition import ReleaseDefinition

# Codes a release may use before it asks for another block: cancellations give stock back,
# and each re-claim takes a fresh code.
CODE_HEADROOM = 2
CODE_SPACE = 100_000_000

STATES = ("scheduled", "paused", "closed")


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def public_document(d: ReleaseDefinition, zone: Any) -> dict[str, Any]:
    """The static part of the release as residents see it (remaining stock is added live)."""
    return {
        "release_id": d.release_id,
        "vaccine": d.vaccine,
        "dose": d.dose,
        "clinic_id": d.clinic_id,
        "department": d.department,
        "mode": d.mode,
        **({"queue": d.queue.model_dump()} if d.mode == "queue" else {}),
        "opens_at": d.opens_at.isoformat(),
        "closes_at": d.closes_at.isoformat(),
        "waves": [
            {"opens_at": w.opens_at.isoformat(), "share": w.share} for w in (d.waves or [])
        ],
        "eligibility": d.eligibility.model_dump(exclude_none=True),
        "cancellation": d.cancellation.model_dump(mode="json", exclude_none=True),
        "limits": d.limits.model_dump(exclude_none=True),
        "slots": [
            {"slot_id": s.slot_id, "starts_at": s.starts_at.isoformat(),
             "ends_at": s.ends_at.isoformat(), "capacity": s.capacity,
             "visit_day": f"{s.starts_at.astimezone(zone):%Y%m%d}",
             "cancel_until": d.cancellation.deadline(s.starts_at, zone).isoformat()}
            for s in d.slots
        ],
    }


async def allocate_codes(conn: Any, release_id: str, size: int) -> int:
    """Reserve `size` consecutive booking sequence numbers for a release; returns the first.

    The exclusive table lock serialises allocators; it is taken only when a release is
    created or runs out of codes, never on the claim path.
    """
    await conn.execute("LOCK TABLE code_blocks IN EXCLUSIVE MODE")
    first = await conn.fetchval("SELECT COALESCE(MAX(first_seq + size), 0) FROM code_blocks")
    if first + size > CODE_SPACE:
        raise Conflict("the 8-digit booking code space is exhausted")
    await conn.execute(
        "INSERT INTO code_blocks (first_seq, size, release_id) VALUES ($1, $2, $3)",
        first, size, release_id,
    )
    return int(first)


async def preheat(
    redis: AnyRedis, d: ReleaseDefinition, zone: Any, code_first: int, code_size: int,
    state: str = "scheduled",
) -> None:
    """Write every key the claim script reads, in one MULTI so no claim sees half of it."""
    rid = d.release_id
    assert rid is not None
    waves = ",".join(f"{epoch_ms(t)},{ppm}" for t, ppm in d.wave_schedule())
    elig = d.eligibility
    meta: dict[str, str | int] = {
        "opens_ms": epoch_ms(d.opens_at),
        "closes_ms": epoch_ms(d.closes_at),
        "state": state,
        "mode": d.mode,
        "waves": waves,
        "min_age": -1 if elig.min_age is None else elig.min_age,
        "max_age": -1 if elig.max_age is None else elig.max_age,
        "sex": elig.sex or "",
        "slots": ",".join(s.slot_id for s in d.slots),
        "left": d.total_capacity,
        "code_next": code_first,
        "code_end": code_first + code_size,
        **queue_meta(d),
    }
    pipe = redis.pipeline(transaction=True)
    pipe.hset(keys.meta_key(rid), mapping=meta)  # type: ignore[arg-type]  # invariant key
    pipe.hset(keys.capacity_key(rid), mapping={s.slot_id: s.capacity for s in d.slots})
    pipe.hset(keys.taken_key(rid), mapping={s.slot_id: 0 for s in d.slots})
    pipe.hset(keys.slot_day_key(rid), mapping={
        s.slot_id: int(s.starts_at.astimezone(zone).strftime("%Y%m%d")) for s in d.slots
    })
    pipe.hset(keys.deadline_key(rid), mapping={
        s.slot_id: epoch_ms(d.cancellation.deadline(s.starts_at, zone)) for s in d.slots
    })
    pipe.hset(keys.cancelled_key(rid), mapping={s.slot_id: 0 for s in d.slots})
    pipe.set(keys.document_key(rid), orjson.dumps(public_document(d, zone)))
    if d.mode == "lottery":  # committed to before the first entry (modes/lottery_draw.py)
        commit_seed(pipe, rid, int(datetime.now(UTC).timestamp() * 1000))
    await pipe.execute()
    # The index lives outside the release's slot, so it is written after the release keys.
    await redis.zadd(keys.RELEASE_INDEX_KEY, {rid: epoch_ms(d.closes_at)})


async def create_release(
    pool: asyncpg.Pool, redis: AnyRedis, d: ReleaseDefinition, zone: Any
) -> None:
    """Insert into PostgreSQL, preheat Redis, then commit: a failed preheat leaves nothing."""
    rid = d.release_id
    assert rid is not None, "parse_definition gives every release an id"
    code_size = max(CODE_HEADROOM * d.total_capacity, 16)
    async with pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute(
                """INSERT INTO releases (release_id, vaccine, dose, clinic_id, department,
                                         opens_at, closes_at, definition)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                rid, d.vaccine, d.dose, d.clinic_id, d.department, d.opens_at, d.closes_at,
                d.model_dump_json(),
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"release {rid} already exists") from None
        await conn.executemany(
            """INSERT INTO slots (release_id, slot_id, starts_at, ends_at, capacity)
               VALUES ($1, $2, $3, $4, $5)""",
            [(rid, s.slot_id, s.starts_at, s.ends_at, s.capacity) for s in d.slots],
        )
        code_first = await allocate_codes(conn, rid, code_size)
        await preheat(redis, d, zone, code_first, code_size)


async def add_code_block(pool: asyncpg.Pool, redis: AnyRedis, release_id: str) -> None:
    """Give a release whose codes ran out a new block (rare: many cancellations)."""
    capacity = sum(int(v) for v in (await redis.hvals(keys.capacity_key(release_id))))
    size = max(capacity, 16)
    async with pool.acquire() as conn, conn.transaction():
        first = await allocate_codes(conn, release_id, size)
        meta = keys.meta_key(release_id)
        # Only move the range when it is still exhausted: another gateway may have won.
        await redis.eval(
            "local r = redis.call('HMGET', KEYS[1], 'code_next', 'code_end') "
            "if tonumber(r[1]) >= tonumber(r[2]) then "
            "redis.call('HSET', KEYS[1], 'code_next', ARGV[1], 'code_end', ARGV[2]) end",
            1, meta, first, first + size,
        )


async def set_state(pool: asyncpg.Pool, redis: AnyRedis, release_id: str, state: str) -> None:
    """Pause, resume ('scheduled') or close; PostgreSQL and Redis, then tell the gateways."""
    assert state in STATES
    async with pool.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            "UPDATE releases SET state = $2 WHERE release_id = $1 RETURNING release_id",
            release_id, state,
        )
        if found is None:
            raise NotFound(f"no release {release_id}")
        await redis.hset(keys.meta_key(release_id), "state", state)
    await redis.publish(keys.RELEASE_EVENTS_CHANNEL, release_id)


async def release_stock(redis: AnyRedis, release_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, per-slot counts) straight from Redis; NotFound when never preheated."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.meta_key(release_id))
    pipe.hgetall(keys.capacity_key(release_id))
    pipe.hgetall(keys.taken_key(release_id))
    pipe.get(keys.document_key(release_id))
    pipe.hgetall(keys.cancelled_key(release_id))
    meta, cap, taken, doc, cancelled = await pipe.execute()
    if not meta or doc is None:
        raise NotFound(f"no release {release_id}")
    return (
        {k.decode(): v.decode() for k, v in meta.items()},
        {"document": orjson.loads(doc),
         "capacity": {k.decode(): int(v) for k, v in cap.items()},
         "taken": {k.decode(): int(v) for k, v in taken.items()},
         "cancelled": {k.decode(): int(v) for k, v in cancelled.items()}},
    )


async def admin_view(redis: AnyRedis, release_id: str) -> dict[str, Any]:
    meta, stock = await release_stock(redis, release_id)
    doc = stock["document"]
    slots = []
    for slot in doc["slots"]:
        sid = slot["slot_id"]
        capacity, taken = stock["capacity"][sid], stock["taken"][sid]
        slots.append({**slot, "capacity": capacity, "remaining": capacity - taken,
                      "claimed": taken, "cancelled": stock["cancelled"].get(sid, 0)})
    return {
        **doc,
        "state": meta["state"],
        "slots": slots,
        "capacity": sum(s["capacity"] for s in slots),
        "remaining": int(meta["left"]),
        "claimed": sum(s["claimed"] for s in slots),
        "cancelled": sum(s["cancelled"] for s in slots),
        "outbox_length": await redis.xlen(keys.outbox_key(release_id)),
        "as_of": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
