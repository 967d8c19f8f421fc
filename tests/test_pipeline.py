"""End to end: claims over HTTP become booking rows and SMS, through the relay, Kafka and
both consumers, also when processes are killed with SIGKILL and the broker restarts."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from processes import Pipeline
from support import Api, Resident, release_definition

from release_service.core import keys, topics
from release_service.devtools.seed import seed_users

STOCK = 500
CLAIMANTS = 2000
SETTLE_SECONDS = 90


@pytest.fixture
async def people(stack_settings, tmp_path) -> list[Resident]:
    out = tmp_path / "users.jsonl"
    await seed_users(stack_settings, CLAIMANTS, out, progress=False)
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    return [Resident(r["account_id"], r["person_ids"][0], r["token"]) for r in rows]


async def run_spike(api: Api, release_id: str, people: list[Resident]) -> dict[str, str]:
    """Everybody claims at once; returns claim_id -> code of every 201."""
    results = await asyncio.gather(*(api.claim(release_id, p) for p in people))
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {201, 409}, statuses
    return {body["claim_id"]: body["code"] for status, _, body in results if status == 201}


async def settle(db: asyncpg.Pool, pipeline: Pipeline, release_id: str) -> tuple[int, int]:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        bookings = await db.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1",
                                     release_id)
        sent = await db.fetchval(
            "SELECT count(*) FROM sms_messages WHERE status = 'sent' AND kind = 'confirmation'")
        if (bookings == STOCK and sent == STOCK) or time.monotonic() > deadline:
            return bookings, sent
        await asyncio.sleep(0.25)


async def check_exactly_once(db: asyncpg.Pool, pipeline: Pipeline, release_id: str,
                             acknowledged: dict[str, str]) -> None:
    assert len(acknowledged) == STOCK
    bookings, sent = await settle(db, pipeline, release_id)
    assert (bookings, sent) == (STOCK, STOCK)
    rows = await db.fetch("SELECT claim_id, code FROM bookings WHERE release_id = $1", release_id)
    assert {r["claim_id"]: r["code"] for r in rows} == acknowledged
    lines = pipeline.sms_lines()
    by_message = Counter(line["message_id"] for line in lines)
    assert len(by_message) == STOCK and set(by_message.values()) == {1}
    codes_in_sms = {code for line in lines for code in acknowledged.values()
                    if code in line["text"]}
    assert codes_in_sms == set(acknowledged.values())


async def consumer_lag(settings, group: str) -> int:
    """Messages in slot.claims past the group's committed offsets. The ends are found by
    reading the topic (the development broker's ListOffsets answers are not usable)."""
    reader = AIOKafkaConsumer(topics.CLAIMS, bootstrap_servers=settings.kafka_bootstrap,
                              group_id=None, auto_offset_reset="earliest")
    await reader.start()
    ends: dict[TopicPartition, int] = {}
    try:
        while batch := await reader.getmany(timeout_ms=1000, max_records=5000):
            for tp, records in batch.items():
                ends[tp] = records[-1].offset + 1
    finally:
        await reader.stop()
    group_view = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group,
                                  enable_auto_commit=False)
    await group_view.start()
    try:
        lag = 0
        for tp, end in ends.items():
            lag += end - (await group_view.committed(tp) or 0)
        return lag
    finally:
        await group_view.stop()


async def test_spike_becomes_exactly_500_bookings_and_sms(api, db, people, pipeline,
                                                          stack_settings):
    release = await api.create_release(release_definition([200, 200, 100]))
    acknowledged = await run_spike(api, release["release_id"], people)
    await check_exactly_once(db, pipeline, release["release_id"], acknowledged)
    deadline = time.monotonic() + 20
    while (lag := await consumer_lag(stack_settings, "bookings")) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert lag == 0


@pytest.mark.parametrize("victim", ["relay", "bookings", "sms"])
async def test_sigkill_during_spike_loses_nothing(api, db, people, pipeline, victim):
    release = await api.create_release(release_definition([200, 200, 100]))
    spike = asyncio.create_task(run_spike(api, release["release_id"], people))
    await asyncio.sleep(random.uniform(0.2, 0.5))
    pipeline.processes[victim].kill(signal.SIGKILL)
    await asyncio.sleep(0.5)
    pipeline.processes[victim].start()
    acknowledged = await spike
    await check_exactly_once(db, pipeline, release["release_id"], acknowledged)


async def test_broker_restart_mid_spike_loses_nothing(api, db, people, pipeline, stack):
    release = await api.create_release(release_definition([200, 200, 100]))
    spike = asyncio.create_task(run_spike(api, release["release_id"], people))
    await asyncio.sleep(0.3)
    stack.stop("kafka")  # memory-only: topics, messages and offsets are gone
    await asyncio.sleep(1.0)
    stack.start("kafka")
    acknowledged = await spike
    await check_exactly_once(db, pipeline, release["release_id"], acknowledged)


async def test_redis_sigkill_mid_spike_loses_no_acknowledged_claim(api, db, people, pipeline,
                                                                    stack, redis):
    """Redis killed with SIGKILL mid-spike and restarted from its append-only file
    (appendfsync everysec): Redis writes the AOF before it replies, so a killed process
    loses nothing it acknowledged (only an OS crash can lose up to a second)."""
    release = await api.create_release(release_definition([200, 200, 100]))
    rid = release["release_id"]
    spike = asyncio.gather(*(api.claim(rid, p) for p in people))
    while int(await redis.hget(keys.meta_key(rid), "left") or STOCK) > STOCK - 100:
        await asyncio.sleep(0.002)  # kill it mid-sale: some sold, most not
    stack.stop("redis", signal.SIGKILL)
    await asyncio.sleep(0.5)
    stack.start("redis")
    results = list(zip(people, await spike, strict=True))
    statuses = Counter(status for _, (status, _, _) in results)
    assert set(statuses) <= {201, 409, 503}, statuses
    acknowledged = {b["claim_id"]: b["code"] for _, (s, _, b) in results if s == 201}
    # Residents refused while Redis was down try again until the release is sold out.
    waiting = [p for p, (status, _, _) in results if status == 503]
    for _ in range(20):
        if not waiting:
            break
        again = await asyncio.gather(*(api.claim(rid, p) for p in waiting))
        acknowledged |= {b["claim_id"]: b["code"] for s, _, b in again if s == 201}
        waiting = [p for p, (status, _, _) in zip(waiting, again, strict=True) if status == 503]
    assert not waiting
    await settle(db, pipeline, rid)
    rows = await db.fetch("SELECT claim_id, code, person_id FROM bookings WHERE release_id = $1",
                          rid)
    persisted = {r["claim_id"]: r["code"] for r in rows}
    lost = set(acknowledged) - set(persisted)
    print(f"Redis SIGKILL: {statuses[503]} answered 503 while down, "
          f"{len(acknowledged)} acknowledged, {len(rows)} persisted, lost {len(lost)}")
    assert not lost  # every acknowledged claim is a booking, with its code
    assert all(persisted[c] == code for c, code in acknowledged.items())
    assert len(rows) <= STOCK  # no oversell
    assert len({r["code"] for r in rows}) == len({r["person_id"] for r in rows}) == len(rows)


async def test_poison_message_goes_to_dead_letter_and_the_partition_moves_on(
    api, db, people, pipeline, stack_settings
):
    release = await api.create_release(release_definition([5]))
    producer = AIOKafkaProducer(bootstrap_servers=stack_settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for poison in (b"\xff not json", b'{"claim_id": 5}', b"[]"):
            await producer.send_and_wait(topics.CLAIMS, poison, key=b"same-partition")
    finally:
        await producer.stop()
    acknowledged = {}
    for person in people[:5]:
        status, _, body = await api.claim(release["release_id"], person)
        assert status == 201
        acknowledged[body["claim_id"]] = body["code"]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        count = await db.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1",
                                  release["release_id"])
        if count == 5:
            break
        await asyncio.sleep(0.2)
    assert count == 5

    dead = AIOKafkaConsumer(topics.CLAIMS_DEAD_LETTER,
                            bootstrap_servers=stack_settings.kafka_bootstrap,
                            auto_offset_reset="earliest", group_id=None)
    await dead.start()
    try:
        found: list = []
        deadline = time.monotonic() + 20
        while len(found) < 3 and time.monotonic() < deadline:
            batch = await dead.getmany(timeout_ms=500)
            found += [r for records in batch.values() for r in records]
    finally:
        await dead.stop()
    values = {r.value for r in found}
    assert {b"\xff not json", b'{"claim_id": 5}', b"[]"} <= values
    assert all(dict(r.headers).get("reason") for r in found)


async def test_cancellation_reaches_the_database_and_sends_its_sms(api, db, people, pipeline):
    release = await api.create_release(release_definition([3]))
    rid = release["release_id"]
    resident = people[0]
    status, _, claim = await api.claim(rid, resident)
    assert status == 201
    status, _, body = await api.call("POST", f"/v1/bookings/{claim['code']}/cancel",
                                     headers=resident.headers)
    assert status == 200 and body["status"] == "cancelled"

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = await db.fetchrow("SELECT status, cancelled_at FROM bookings WHERE claim_id = $1",
                                claim["claim_id"])
        kinds = {r["kind"] for r in await db.fetch(
            "SELECT kind FROM sms_messages WHERE claim_id = $1 AND status = 'sent'",
            claim["claim_id"])}
        if row is not None and row["status"] == "cancelled" and len(kinds) == 2:
            break
        await asyncio.sleep(0.2)
    assert row is not None and row["status"] == "cancelled" and row["cancelled_at"]
    assert kinds == {"confirmation", "cancellation"}
    texts = [line["text"] for line in pipeline.sms_lines() if claim["code"] in line["text"]]
    assert len(texts) == 2 and any("已取消" in text for text in texts)
    status, _, body = await api.call("GET", f"/v1/bookings/{claim['code']}",
                                     headers=resident.headers)
    assert body["status"] == "cancelled" and body["persisted"] is True


async def test_request_id_travels_from_the_gateway_to_the_sms_log(api, db, people, pipeline):
    release = await api.create_release(release_definition([2]))
    request_id = "trace-me-0123456789"
    resident = people[0]
    status, headers, claim = await api.call(
        "POST", f"/v1/releases/{release['release_id']}/claims",
        json={"person_id": resident.person_id},
        headers={**resident.headers, "X-Request-Id": request_id})
    assert status == 201 and headers["X-Request-Id"] == request_id
    log = pipeline.processes["sms"].log_path
    deadline = time.monotonic() + 30
    line = None
    while time.monotonic() < deadline and line is None:
        for text in log.read_text().splitlines() if log.exists() else []:
            entry = orjson.loads(text) if text.startswith("{") else {}
            if entry.get("request_id") == request_id:
                line = entry
        await asyncio.sleep(0.2)
    assert line is not None and claim["claim_id"] in line["message"]
    assert resident.person_id not in line["message"]
    phone = await db.fetchval("SELECT phone FROM accounts WHERE account_id = $1",
                              resident.account_id)
    assert phone not in log.read_text() and phone[:3] + "****" + phone[-4:] in line["message"]
