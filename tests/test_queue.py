"""Queue mode: the waiting room's scripts driven directly (fairness with 20,000 persons)
and over HTTP (join, standing, events, the admission token on the claim)."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time

import orjson
import pytest
from redis.crc import key_slot
from support import Api, release_definition, residents

from release_service.core import keys
from release_service.modes.queue import AdmissionTokens, shuffled
from release_service.releases.definition import parse_definition
from release_service.releases.store import preheat
from release_service.scripts.claim import ClaimRequest, ClaimScript
from release_service.scripts.queue import QueueScripts
from release_service.scripts.restore import RestoreScript

QUEUED, BOTS, STOCK, FACTOR, SEED = 20_000, 2_000, 2_000, 1.2, 20261123
LATE = 500  # humans who join after the opening, behind the shuffled pre-queue


async def _join_all(room: QueueScripts, rid: str, persons: list[str]) -> list:
    """Each person's join script call, in join order, 1,000 to a pipeline."""
    out: list = []
    for start in range(0, len(persons), 1000):
        out += await room.join_many(rid, persons[start:start + 1000])
    return out


async def test_fairness_of_20000_queued_with_bots_first_and_fastest(redis, stack_settings):
    definition = parse_definition(release_definition(
        [STOCK // 2, STOCK // 2], opens_in=8, mode="queue",
        queue={"admit_factor": FACTOR, "max_admit_per_second": 300, "token_seconds": 3}))
    rid = definition.release_id
    assert rid is not None
    await preheat(redis, definition, definition.opens_at.tzinfo, 0, 4 * STOCK)
    await redis.hset(keys.meta_key(rid), "q_seed", SEED)  # a fixed seed: a fixed draw
    room, claim = QueueScripts(redis), ClaimScript(redis, stack_settings.code_secret)
    bots = [f"bot{i}" for i in range(BOTS)]
    humans = [f"hum{i}" for i in range(QUEUED - BOTS - LATE)]

    # Bots join first, then the humans, all before the opening.
    started = time.time()
    joined = await _join_all(room, rid, bots)
    joined += await _join_all(room, rid, humans)
    print(f"joined {len(joined)} in {time.time() - started:.1f} s")
    assert {(s.status, s.ahead, s.joined) for s in joined} == {("waiting", -1, True)}
    assert (await room.join(rid, bots[0])).status == "waiting"  # one entry per person
    await asyncio.sleep(max(0.0, definition.opens_at.timestamp() - time.time()))
    late = [f"late{i}" for i in range(LATE)]
    await _join_all(room, rid, late)

    # The admission order is the recorded seed's shuffle of the join order, then arrivals.
    q = keys.queue_keys(rid)
    head = (await room.status(rid)).admitted_total
    order = shuffled(bots + humans, SEED) + late
    assert [p.decode() for p in await redis.lrange(q["line"], 0, -1)] == order[head:]

    admitted: list[str] = []
    winners: list[str] = []
    abandon = random.Random(SEED)
    checked = late_uses = abandoned = 0
    while True:
        standing = await room.status(rid)
        if standing.admitted_now:  # admitted only while unfinished <= factor x stock
            assert await redis.zcard(q["live"]) <= math.ceil(FACTOR * standing.available)
            checked += 1
        fresh = order[len(admitted):standing.admitted_total]
        admitted += fresh
        if not fresh and standing.release == "sold_out":
            break
        # Bots retry fastest: every admitted bot claims before any human of the round.
        fresh.sort(key=lambda p: not p.startswith("bot"))
        for person in fresh:
            mine = await room.status(rid, person)
            if mine.status != "admitted":  # expired before this driver came to it
                late_uses += 1
                continue
            if person.startswith("hum") and abandon.random() < 0.05:
                abandoned += 1
                continue  # never comes back: the admission expires and is returned
            outcome, = await claim(rid, [ClaimRequest(
                secrets.token_hex(12), "acct-" + person, person, "", "", 19900101, "F",
                admission=mine.jti)])
            if outcome.status == "admission":  # this driver was slower than the token
                assert outcome.detail == "expired", outcome
                late_uses += 1
            elif outcome.status == "ok":
                winners.append(person)
            else:  # the stock went while the admission waited: spent all the same
                assert outcome.status == "sold_out", outcome
        if not fresh:
            await asyncio.sleep(0.02)

    assert len(winners) == STOCK == len(set(winners))
    assert len(admitted) == len(set(admitted))  # nobody admitted twice
    await asyncio.sleep(3.1)  # every admission left unused has expired: all returned
    await room.status(rid)
    marks = [v[:2] for v in await redis.hvals(q["jtis"])]
    assert len(marks) == len(admitted)
    assert marks.count(b"x:") == abandoned + late_uses > 0
    assert len(admitted) - abandoned - late_uses <= math.ceil(FACTOR * STOCK)
    assert (await room.status(rid)).release == "sold_out"
    # Fairness: bots are 10% of the queue; under a fair draw their wins are binomial.
    share = BOTS / QUEUED
    bot_wins = sum(p.startswith("bot") for p in winners)
    sd = math.sqrt(STOCK * share * (1 - share))
    print(f"bots won {bot_wins} of {STOCK} (fair: {STOCK * share:.0f} +- {sd:.1f}); "
          f"{len(admitted)} admitted ({abandoned} abandoned, {late_uses} too late), "
          f"{checked} admitting advances")
    assert abs(bot_wins - STOCK * share) <= 4 * sd


@pytest.fixture
async def queue_release(api: Api) -> dict:
    return await api.create_release(release_definition(
        [2], opens_in=-1, mode="queue", queue={"token_seconds": 2}))


async def _join(api: Api, rid: str, resident) -> dict:
    status, _, body = await api.call("POST", f"/v1/releases/{rid}/queue",
                                     json={"person_id": resident.person_id},
                                     headers=resident.headers)
    assert status in (200, 201), body
    return body


async def _claim(api: Api, rid: str, resident, token: object, person_id: str | None = None):
    body = {"person_id": person_id or resident.person_id}
    if token is not None:
        body["admission_token"] = token
    return await api.call("POST", f"/v1/releases/{rid}/claims", json=body,
                          headers=resident.headers)


async def test_admission_tokens_forged_expired_reused_or_for_others_are_refused(
        api, redis, queue_release, stack_settings):
    rid = queue_release["release_id"]
    other = await api.create_release(release_definition([2], mode="queue"))
    a, b, c = residents(stack_settings, 3)
    standing = await _join(api, rid, a)
    assert standing["status"] == "admitted" and standing["release_status"] == "open", standing
    token = standing["admission_token"]
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    codec = AdmissionTokens(stack_settings.token_secret)
    jti = codec.verify(token, rid, a.person_id)
    refusals = [
        (a, None, None, "missing"),
        (a, forged, None, "invalid"),
        (a, "qa1.e30." + token.rsplit(".", 1)[1], None, "invalid"),
        (b, token, b.person_id, "other"),  # another person's token
        (a, codec.issue(other["release_id"], a.person_id, jti, 2**62), None, "other"),
        (a, codec.issue(rid, a.person_id, "f" * 24, 2**62), None, "invalid"),  # never issued
    ]
    for who, bad, person, reason in refusals:
        status, _, body = await _claim(api, rid, who, bad, person)
        assert (status, body["code"], body["reason"]) == (403, "forbidden", reason), reason
    keyed = {**a.headers, "Idempotency-Key": "k-" + a.person_id}
    claim = {"person_id": a.person_id, "admission_token": token}
    won = await api.call("POST", f"/v1/releases/{rid}/claims", json=claim, headers=keyed)
    assert won[0] == 201
    status, _, body = await _claim(api, rid, a, token)  # spent, and the person holds one
    assert (status, body["code"]) == (409, "already_claimed")
    # The claim script says so too when asked directly (the person's reservation usually
    # answers first): a holder is told already_claimed, whatever the admission's state.
    again, = await ClaimScript(redis, stack_settings.code_secret)(rid, [ClaimRequest(
        "c-again", a.account_id, a.person_id, "", "", 19900101, "F", admission=jti)])
    assert again.status == "already_claimed"
    # The retry of the claim that spent it is answered with that claim (its reply lost).
    status, headers, body = await api.call("POST", f"/v1/releases/{rid}/claims", json=claim,
                                           headers=keyed)
    assert (status, headers.get("Idempotent-Replayed"), body["code"]) == (
        201, "true", won[2]["code"])
    # An admission left unused expires: refused, and its place goes to the next person.
    late = await _join(api, rid, c)
    assert late["status"] == "admitted"
    await asyncio.sleep(2.1)
    status, _, body = await _claim(api, rid, c, late["admission_token"])
    assert (status, body["reason"]) == (403, "expired")
    assert (await api.admin_release(rid))["remaining"] == 1


async def test_standing_polled_and_streamed_until_sold_out(api, stack_settings):
    release = await api.create_release(release_definition(
        [1], opens_in=-1, mode="queue", queue={"admit_factor": 1}))
    rid = release["release_id"]
    a, b = residents(stack_settings, 2)
    first, second = await _join(api, rid, a), await _join(api, rid, b)
    assert first["status"] == "admitted"
    assert (second["status"], second["position"]) == ("waiting", 1)
    assert second["estimated_wait_seconds"] is not None
    again = await api.call("POST", f"/v1/releases/{rid}/queue",
                           json={"person_id": b.person_id}, headers=b.headers)
    assert again[0] == 200  # one entry per person
    assert (await _claim(api, rid, a, first["admission_token"]))[0] == 201
    status, _, polled = await api.call("GET", f"/v1/releases/{rid}/queue/{b.person_id}",
                                       headers=b.headers)
    assert status == 200 and polled["release_status"] == "sold_out"
    async with api.session.get(f"{api.base_url}/ops/stream",
                               headers=api.admin_headers) as response:
        snapshot = orjson.loads((await response.content.readuntil(b"\n\n")).split(b"data: ")[1])
    ops, = [r for r in snapshot["releases"] if r["release_id"] == rid]
    assert ops["mode"] == "queue" and ops["queue"] == {"waiting": 1, "admitted": 1}
    async with api.session.get(f"{api.base_url}/v1/releases/{rid}/queue/{b.person_id}/events",
                               headers=b.headers) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        text = await asyncio.wait_for(response.text(), 10)  # ends itself once sold out
    events = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1]["release_status"] == "sold_out"
    late, = residents(stack_settings, 1)
    status, _, body = await api.call("POST", f"/v1/releases/{rid}/queue",
                                     json={"person_id": late.person_id}, headers=late.headers)
    assert (status, body["code"]) == (409, "sold_out")  # nobody queues for stock gone


async def _claim_once_admitted(api: Api, rid: str, resident) -> int:
    """Poll the standing until admitted, then claim: the claim's status (0: told it is
    sold out while waiting)."""
    for _ in range(400):
        status, _, standing = await api.call(
            "GET", f"/v1/releases/{rid}/queue/{resident.person_id}", headers=resident.headers)
        assert status == 200
        if standing["status"] == "admitted":
            return (await _claim(api, rid, resident, standing["admission_token"]))[0]
        if standing["release_status"] == "sold_out":
            return 0
        await asyncio.sleep(0.05)
    raise AssertionError("never admitted nor told it is sold out")


def test_every_queue_key_is_in_the_release_slot():
    rid = "rel-0123"
    slots = {key_slot(k.encode()) for k in [keys.meta_key(rid), *keys.queue_keys(rid).values()]}
    assert len(slots) == 1


async def test_queue_refusals_are_problem_documents(api, queue_release, stack_settings):
    rid = queue_release["release_id"]
    a, b = residents(stack_settings, 2)
    plain = await api.create_release(release_definition([1]))
    cases = [
        ("POST", f"/v1/releases/{rid}/queue", {"person_id": b.person_id}, a, 403),
        ("POST", f"/v1/releases/{rid}/queue", {}, a, 403),
        ("POST", f"/v1/releases/{plain['release_id']}/queue", {"person_id": a.person_id}, a,
         409),
        ("POST", "/v1/releases/none/queue", {"person_id": a.person_id}, a, 404),
        ("GET", f"/v1/releases/{rid}/queue/{a.person_id}", None, a, 404),  # never joined
        ("GET", f"/v1/releases/{rid}/queue/{a.person_id}", None, b, 403),
    ]
    for method, path, body, who, expected in cases:
        status, _, problem = await api.call(method, path, json=body, headers=who.headers)
        assert status == expected and problem["code"] and problem["detail"], (path, problem)
    assert (await api.admin_release(rid))["remaining"] == 2


async def test_concurrent_residents_over_http_sell_exactly_the_stock(api, redis, stack_settings):
    """200 residents join at once, poll concurrently and claim as soon as admitted (some
    also try without a token first): exactly the stock is sold, each person at most
    once, and every booking had its own admission."""
    release = await api.create_release(release_definition(
        [30, 20], opens_in=-1, mode="queue",
        queue={"admit_factor": 1.2, "max_admit_per_second": 400}))
    rid = release["release_id"]
    people = residents(stack_settings, 200)
    await asyncio.gather(*(_join(api, rid, r) for r in people))

    async def resident_flow(r) -> int:
        if r.person_id[-1] in "01234567":  # some try their luck without the queue first
            assert (await _claim(api, rid, r, None))[0] == 403
        return await _claim_once_admitted(api, rid, r)

    results = await asyncio.gather(*(resident_flow(r) for r in people))
    assert results.count(201) == 50 and set(results) <= {201, 409, 0}
    view = await api.admin_release(rid)
    assert view["remaining"] == 0 and await redis.hlen(keys.holders_key(rid)) == 50
    marks = [v[:2] for v in await redis.hvals(keys.queue_keys(rid)["jtis"])]
    assert marks.count(b"u:") == results.count(201) + results.count(409)
    assert await redis.zcard(keys.queue_keys(rid)["live"]) == 0


async def test_a_refusal_that_may_pass_leaves_the_admission(api, redis, stack_settings):
    """A full slot with stock elsewhere does not spend the admission: the person tries the
    other slot with the same token. A win spends it."""
    release = await api.create_release(release_definition([1, 1], opens_in=-1, mode="queue"))
    rid = release["release_id"]
    a, b = residents(stack_settings, 2)
    first, second = await _join(api, rid, a), await _join(api, rid, b)
    assert first["status"] == second["status"] == "admitted"

    async def claim(who, standing, slot_id):
        return await api.call("POST", f"/v1/releases/{rid}/claims", headers=who.headers, json={
            "person_id": who.person_id, "slot_id": slot_id,
            "admission_token": standing["admission_token"]})

    assert (await claim(a, first, "s0"))[0] == 201
    status, _, body = await claim(b, second, "s0")
    assert (status, body["code"]) == (409, "sold_out")
    assert (await claim(b, second, "s1"))[0] == 201
    marks = await redis.hgetall(keys.queue_keys(rid)["jtis"])
    assert sorted(v[:2] for v in marks.values()) == [b"u:", b"u:"]


async def test_admissions_reach_postgresql_through_the_outbox(api, db, redis, pipeline,
                                                               stack_settings):
    """Every admission is an outbox event the bookings consumer persists: PostgreSQL holds
    each admission once, in admission order, and every booking of the release had one."""
    release = await api.create_release(release_definition(
        [4], opens_in=-1, mode="queue", queue={"admit_factor": 1, "max_admit_per_second": 100}))
    rid = release["release_id"]
    people = residents(stack_settings, 8)
    for r in people:
        await _join(api, rid, r)

    results = await asyncio.gather(*(_claim_once_admitted(api, rid, r) for r in people))
    assert results.count(201) == 4
    issued = {k.decode(): v.decode().split(":")[-1]
              for k, v in (await redis.hgetall(keys.queue_keys(rid)["jtis"])).items()}
    rows = []
    for _ in range(300):  # the relay and the consumer are asynchronous
        rows = await db.fetch("SELECT admission_id, person_id, position FROM admissions "
                              "WHERE release_id = $1 ORDER BY position", rid)
        booked = {r["person_id"] for r in await db.fetch(
            "SELECT person_id FROM bookings WHERE release_id = $1", rid)}
        if len(rows) == len(issued) and len(booked) == 4:
            break
        await asyncio.sleep(0.1)
    assert {r["admission_id"]: r["person_id"] for r in rows} == issued
    assert [r["position"] for r in rows] == list(range(1, len(issued) + 1))
    assert len({r["person_id"] for r in rows}) == len(rows)  # nobody admitted twice
    assert booked <= set(issued.values())


async def test_a_refusal_no_retry_can_change_spends_the_admission(api, redis, stack_settings):
    release = await api.create_release(release_definition(
        [2], opens_in=-1, mode="queue", eligibility={"min_age": 110}))
    rid = release["release_id"]
    a, = residents(stack_settings, 1)
    standing = await _join(api, rid, a)
    status, _, body = await _claim(api, rid, a, standing["admission_token"])
    assert (status, body["code"]) == (403, "not_eligible")
    status, _, body = await _claim(api, rid, a, standing["admission_token"])
    assert (status, body["reason"]) == (403, "used")
    assert await redis.zcard(keys.queue_keys(rid)["live"]) == 0  # its place is free


async def test_claims_written_back_after_a_redis_loss_finish_their_room_entries(
        api, redis, stack_settings):
    """Redis came back without its last writes (an OS crash under everysec), so the room
    replays admissions of persons whose bookings PostgreSQL holds; reconcile writes their
    claims back. Such a person neither keeps an admission that holds room until it
    expires nor is admitted again: the place goes to the next person."""
    release = await api.create_release(release_definition(
        [5], opens_in=-1, mode="queue", queue={"max_admit_per_second": 1}))
    rid = release["release_id"]
    a, b, c = residents(stack_settings, 3)
    assert (await _join(api, rid, a))["status"] == "admitted"  # the second's worth
    assert (await _join(api, rid, b))["status"] == "waiting"
    assert (await _join(api, rid, c))["status"] == "waiting"
    q = keys.queue_keys(rid)
    jti = (await redis.hget(q["who"], a.person_id)).decode().split(":")[1]

    def booked(resident, code: str) -> bytes:
        return orjson.dumps({
            "claim_id": secrets.token_hex(12), "code": code, "release_id": rid,
            "slot_id": "s0", "person_id": resident.person_id, "account_id": resident.account_id,
            "status": "confirmed", "claimed_at_ms": int(time.time() * 1000)})

    restore = RestoreScript(redis, stack_settings.code_secret)
    assert await restore(rid, [booked(a, "10000001"), booked(b, "10000002")]) == \
        ["restored", "restored"]
    # The admitted one's admission is spent, as a claim would have spent it.
    assert await redis.hget(q["who"], a.person_id) == b"u"
    assert await redis.hget(q["jtis"], jti) == f"u:{a.person_id}".encode()
    assert await redis.zscore(q["live"], jti) is None

    await asyncio.sleep(1.1)  # one more admission allowed: b is next, but booked
    standing_c = (await api.call("GET", f"/v1/releases/{rid}/queue/{c.person_id}",
                                 headers=c.headers))[2]
    assert standing_c["status"] == "admitted"
    standing_b = (await api.call("GET", f"/v1/releases/{rid}/queue/{b.person_id}",
                                 headers=b.headers))[2]
    assert standing_b["status"] == "used"
    assert await redis.zcard(q["live"]) == 1  # c's admission only
