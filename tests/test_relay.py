"""Relay and reconcile: Kafka down, several relays at once, the reconcile command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from processes import ServiceProcess, stop_all
from support import Resident, release_definition, residents

from release_service.core import keys, topics
from release_service.core.kafka import kafka_producer, unread
from release_service.devtools.seed import seed_users
from release_service.pipeline.reconcile import Reconciler


async def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def bookings(settings, release_id: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1",
                                   release_id)
    finally:
        await conn.close()


async def test_kafka_down_gateway_keeps_claiming_and_readyz_says_so(
    api, stack, stack_settings, redis
):
    release = await api.create_release(release_definition([10]))
    people = residents(stack_settings, 3)
    stack.stop("kafka")
    try:
        status, _, body = await wait_for(
            lambda: _ready_down(api), timeout=10)  # the probe caches for 2 s
        assert status == 503 and body["checks"] == {"redis": "up", "kafka": "down"}
        for person in people:
            assert (await api.claim(release["release_id"], person))[0] == 201
        assert await redis.xlen(keys.outbox_key(release["release_id"])) == 3
    finally:
        stack.start("kafka")
    assert (await wait_for(lambda: _ready_up(api), timeout=10))[0] == 200


async def _ready_down(api):
    answer = await api.call("GET", "/readyz")
    return answer if answer[0] == 503 else None


async def _ready_up(api):
    answer = await api.call("GET", "/readyz")
    return answer if answer[0] == 200 else None


async def test_two_relays_share_the_outbox_and_every_booking_arrives_once(
    api, stack_settings, tmp_path, redis
):
    release = await api.create_release(release_definition([150]))
    rid = release["release_id"]
    people = residents(stack_settings, 150)
    processes = [
        ServiceProcess(stack_settings, tmp_path, "relay", name="relay-a"),
        ServiceProcess(stack_settings, tmp_path, "relay", name="relay-b"),
        ServiceProcess(stack_settings, tmp_path, "consume", "bookings", name="bookings"),
    ]
    for process in processes:
        process.start()
    try:
        results = await asyncio.gather(*(api.claim(rid, p) for p in people))
        assert [r[0] for r in results] == [201] * 150
        assert await wait_for(lambda: _count_is(stack_settings, rid, 150)) == 150
        assert all(p.process is not None and p.process.poll() is None for p in processes)
        info = await redis.xinfo_groups(keys.outbox_key(rid))
        assert info[0]["pending"] == 0  # every entry acknowledged, by whichever relay
    finally:
        stop_all(processes)


async def _count_is(settings, release_id: str, expected: int) -> int | None:
    count = await bookings(settings, release_id)
    return count if count == expected else None


async def test_reconcile_publishes_what_never_left_the_outbox_then_trims_it(
    api, stack_settings, tmp_path, redis
):
    release = await api.create_release(release_definition([20]))
    rid = release["release_id"]
    for person in residents(stack_settings, 20):
        assert (await api.claim(rid, person))[0] == 201
    consumer = ServiceProcess(stack_settings, tmp_path, "consume", "bookings",
                              name="bookings").start()
    env = {"PATH": "/usr/bin:/bin",
           "RELEASE_SERVICE_SETTINGS_FILE": str(consumer.settings_file)}
    cli = str(Path(sys.executable).parent / "release-service")
    try:
        # No relay ran: reconcile (grace 0) publishes every entry itself.
        first = subprocess.run([cli, "reconcile", "--grace", "0"], env=env,
                               capture_output=True, text=True, check=True, timeout=60)
        assert "outbox entries: 20" in first.stdout and "republished: 20" in first.stdout
        assert await wait_for(lambda: _count_is(stack_settings, rid, 20)) == 20
        second = subprocess.run([cli, "reconcile", "--grace", "0"], env=env,
                                capture_output=True, text=True, check=True, timeout=60)
        assert "trimmed: 20" in second.stdout
        assert await redis.xlen(keys.outbox_key(rid)) == 0
    finally:
        consumer.stop()


async def test_reconcile_removes_reservations_of_claims_that_never_happened(
    api, stack_settings, tmp_path, redis
):
    release = await api.create_release(release_definition([5]))
    rid = release["release_id"]
    kept, = residents(stack_settings, 1)
    assert (await api.claim(rid, kept))[0] == 201
    # A gateway that died between the reservation and the claim left this behind.
    stale = keys.person_active_key("p-orphan")
    await redis.hset(stale, "claim-never-made", f"{rid}|20991231|c|d|1000")
    cli = str(Path(sys.executable).parent / "release-service")
    settings_file = tmp_path / "reconcile.env"
    from release_service.core.settings import write_settings_file

    write_settings_file(settings_file, {f: getattr(stack_settings, f) for f in (
        "redis_url", "kafka_bootstrap", "database_url", "admin_token", "token_secret",
        "code_secret")})
    run = subprocess.run([cli, "reconcile", "--grace", "0"], capture_output=True, text=True,
                         check=False, timeout=60,
                         env={"PATH": "/usr/bin:/bin",
                              "RELEASE_SERVICE_SETTINGS_FILE": str(settings_file)})
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "stale reservations: 1" in out
    assert not await redis.exists(stale)
    assert await redis.hlen(keys.person_active_key(kept.person_id)) == 1


async def test_reconcile_republishes_missing_sms_only_once_the_sms_consumers_read_all(
    api, stack_settings, tmp_path, redis, db
):
    """An SMS not sent yet while its claim event waits unread is not lost: a stopped SMS
    consumer does not come back to the same events republished pass after pass. Once
    the consumers have read everything, what is still missing is published again."""
    rid = (await api.create_release(release_definition([10])))["release_id"]
    await seed_users(stack_settings, 10, tmp_path / "users.jsonl", progress=False)
    for line in (tmp_path / "users.jsonl").read_bytes().splitlines():  # accounts with phones
        account = orjson.loads(line)
        person = Resident(account["account_id"], account["person_ids"][0], account["token"])
        assert (await api.claim(rid, person))[0] == 201
    producer = kafka_producer(stack_settings)
    await producer.start()
    reconciler = Reconciler(stack_settings, redis, db, producer, grace_seconds=0)
    bookings_consumer = ServiceProcess(stack_settings, tmp_path, "consume", "bookings",
                                       name="bookings").start()
    sms_consumer = ServiceProcess(stack_settings, tmp_path, "consume", "sms", name="sms",
                                  sms_sink_path=str(tmp_path / "sink.jsonl"))
    try:
        assert (await reconciler.run_once()).republished == 10  # no relay ran
        assert await wait_for(lambda: _count_is(stack_settings, rid, 10)) == 10
        for _ in range(3):  # no SMS consumer runs: ten SMS missing, their events unread
            report = await reconciler.run_once()
            assert (report.missing_sms, report.republished) == (10, 0), report
            # At least one: Tansu's end offset stops at its last batch's first record.
            assert report.sms_backlog > 0

        sms_consumer.start()
        assert await wait_for(lambda: _sent(db, rid, 10)) == 10  # from the first events
        assert await wait_for(lambda: _unread_is_zero(stack_settings), timeout=60)
        # Three SMS rows lost (as if never written): published again, and sent.
        await db.execute("DELETE FROM sms_messages WHERE claim_id IN (SELECT claim_id FROM "
                         "bookings WHERE release_id = $1 ORDER BY claim_id LIMIT 3)", rid)
        report = await reconciler.run_once()
        assert (report.missing_sms, report.sms_backlog, report.republished) == (3, 0, 3)
        assert await wait_for(lambda: _sent(db, rid, 10)) == 10
    finally:
        stop_all([sms_consumer, bookings_consumer])
        await producer.stop()


async def _sent(db: asyncpg.Pool, release_id: str, expected: int) -> int | None:
    count = await db.fetchval(
        "SELECT count(*) FROM sms_messages m JOIN bookings b USING (claim_id) "
        "WHERE b.release_id = $1 AND m.kind = 'confirmation' AND m.status = 'sent'",
        release_id)
    return count if count == expected else None


async def _unread_is_zero(settings) -> bool:
    return await unread(settings, topics.SMS_GROUP, topics.CLAIMS) == 0


@pytest.mark.parametrize("command", [("relay",), ("consume", "bookings"), ("consume", "sms")])
def test_processes_stop_promptly_while_kafka_is_unreachable(stack_settings, tmp_path, command):
    process = ServiceProcess(stack_settings, tmp_path, *command, name="-".join(command),
                             kafka_bootstrap="127.0.0.1:1").start()
    time.sleep(2)  # retrying its start against a port nobody listens on
    assert process.process is not None and process.process.poll() is None
    started = time.monotonic()
    process.stop()  # SIGTERM; fails the test if it needs SIGKILL
    assert time.monotonic() - started < 10
    assert process.process.returncode == 0, process.log()
