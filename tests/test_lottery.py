"""Lottery releases: the draw is reproducible from its published seed, winners are booked
through the normal claim path (booking row, confirmation SMS) and every other entry is told
by SMS, once."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter

import orjson
from support import Resident, release_definition, residents

from release_service.core import keys
from release_service.devtools.seed import seed_users
from release_service.modes.lottery import entry_claim_id
from release_service.modes.lottery_draw import (
    DRAW_ALGORITHM,
    draw_order,
    seed_commitment,
    seed_from,
)
from release_service.releases.catalog import ReleaseCatalog
from release_service.scripts.claim import ClaimRequest, ClaimScript
from release_service.scripts.reserve import Reservation, ReserveScript

SETTLE_SECONDS = 60


def verify(entries: int, seed: int) -> list[int]:
    """The check a resident runs, written from the published description alone."""
    rng = random.Random(seed)
    order = list(range(1, entries + 1))
    for i in range(entries - 1, 0, -1):
        j = rng.getrandbits(64) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def recompute(r: dict, seed_sha256: str) -> list[int]:
    """README's check of a published result `r` against the commitment seen before the
    draw, line for line: the winners as anyone recomputes them."""
    assert hashlib.sha256(r["seed"].encode()).hexdigest() == seed_sha256
    rng, order = random.Random(int(r["seed"])), list(range(1, r["entries"] + 1))
    for i in range(r["entries"] - 1, 0, -1):
        j = rng.getrandbits(64) % (i + 1)
        order[i], order[j] = order[j], order[i]
    skipped = {s["entry"] for s in r["skipped"]}
    picked = order[:len(r["winners"]) + len(skipped)]
    assert skipped <= set(picked)
    return [n for n in picked if n not in skipped]


async def committed_seed(redis, release_id: str, secret: str) -> int:
    """The seed the service keeps secret until the draw (the test derives it, with the
    server's secret, to arrange a skip, and to compare)."""
    fixed = await redis.hgetall(keys.lottery_seed_key(release_id))
    return seed_from(secret, release_id, {k.decode(): v.decode() for k, v in fixed.items()})


async def redis_dump(redis) -> bytes:
    """Every key and value in Redis (strings, hashes, lists), joined: to search for a
    secret in what a reader of Redis sees."""
    parts = []
    async for key in redis.scan_iter(count=1000):
        kind = await redis.type(key)
        if kind == b"string":
            parts.append(await redis.get(key))
        elif kind == b"hash":
            parts += [b"%s=%s" % kv for kv in (await redis.hgetall(key)).items()]
        elif kind == b"list":
            parts += await redis.lrange(key, 0, -1)
        parts.append(key)
    return b"\n".join(parts)


def test_draw_is_reproducible_from_its_seed():
    assert draw_order(1000, 42) == draw_order(1000, 42) == verify(1000, 42)
    assert draw_order(1000, 43) != draw_order(1000, 42)
    assert sorted(draw_order(1000, 7)) == list(range(1, 1001))
    assert draw_order(0, 1) == [] and draw_order(1, 1) == [1]
    assert DRAW_ALGORITHM.startswith("fisher-yates")
    assert seed_commitment(42) == hashlib.sha256(b"42").hexdigest()


def test_a_million_entry_draw_time():
    started = time.perf_counter()
    order = draw_order(1_000_000, 2**127 + 12345)
    elapsed = time.perf_counter() - started
    print(f"\n1,000,000-entry draw: {elapsed:.2f} s")
    assert len(order) == 1_000_000 and order[:3] == verify(1_000_000, 2**127 + 12345)[:3]


async def enter(api, release_id: str, who: Resident) -> tuple[int, dict]:
    status, _, body = await api.call("POST", f"/v1/releases/{release_id}/lottery/entries",
                                     headers=who.headers, json={"person_id": who.person_id})
    return status, body


async def drawn(api, release_id: str) -> dict:
    """The result once a gateway has drawn at the draw time."""
    deadline = time.monotonic() + 30
    while (result := (await api.call("GET", f"/v1/releases/{release_id}/lottery"))[2]
           )["state"] != "drawn":
        assert time.monotonic() < deadline, result
        await asyncio.sleep(0.2)
    return result


async def test_winners_are_booked_and_the_rest_told_by_sms(api, db, pipeline, redis,
                                                          stack_settings, tmp_path):
    out = tmp_path / "users.jsonl"
    await seed_users(stack_settings, 120, out, progress=False)
    people = [Resident(r["account_id"], r["person_ids"][0], r["token"])
              for r in map(orjson.loads, out.read_text().splitlines())]
    release = await api.create_release(release_definition([5, 5], closes_in=4,
                                                          mode="lottery"))
    rid = release["release_id"]
    entered = await asyncio.gather(*(enter(api, rid, p) for p in people))
    assert sorted(body["entry"] for _, body in entered) == list(range(1, 121))
    person_of = {body["entry"]: people[i] for i, (_, body) in enumerate(entered)}

    result = await drawn(api, rid)
    assert result["entries"] == 120 and result["algorithm"] == DRAW_ALGORITHM
    assert result["winners"] == verify(120, int(result["seed"]))[:10]
    assert result["skipped"] == []
    holders = {k.decode() for k in await redis.hgetall(keys.holders_key(rid))}
    assert holders == {person_of[n].person_id for n in result["winners"]}

    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        kinds = Counter(r["kind"] for r in await db.fetch(
            "SELECT kind FROM sms_messages WHERE status = 'sent'"))
        if kinds == {"confirmation": 10, "lottery_lost": 110}:
            break
        await asyncio.sleep(0.25)
    assert kinds == {"confirmation": 10, "lottery_lost": 110}
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1", rid) == 10
    lines = pipeline.sms_lines()
    assert len({line["message_id"] for line in lines}) == len(lines) == 120
    phones = {r["account_id"]: r["phone"] for r in await db.fetch(
        "SELECT account_id, phone FROM accounts")}
    told = Counter(line["phone"] for line in lines if "未中签" in line["text"])
    assert told == Counter(phones[p.account_id] for n, p in person_of.items()
                           if n not in result["winners"])


async def test_a_draw_run_again_after_a_crash_keeps_the_committed_seed(api, redis,
                                                                      stack_settings):
    """A draw that died after booking its first winner: the gateway that draws next uses
    the seed committed to at the release's creation, finds that booking made, books no
    one twice."""
    people = residents(stack_settings, 10)
    rid = (await api.create_release(release_definition([3], closes_in=3, mode="lottery"))
           )["release_id"]
    commitment = (await api.call("GET", f"/v1/releases/{rid}/lottery"))[2]["seed_sha256"]
    for n, who in enumerate(people, 1):
        assert (await enter(api, rid, who))[1]["entry"] == n
    seed = await committed_seed(redis, rid, stack_settings.code_secret)
    first = verify(10, seed)[0]
    await redis.hset(keys.lottery_result_key(rid), mapping={
        "entries": 10, "state": "drawing", "algorithm": DRAW_ALGORITHM})
    claim_id = entry_claim_id(rid, seed, first)
    winner = people[first - 1]
    catalog = ReleaseCatalog(redis, 1.0)
    await catalog.refresh()
    view = catalog.get(rid)
    assert view is not None
    [reserved] = await ReserveScript(redis).reserve("", [Reservation(
        claim_id, winner.person_id, rid, view.visit_day("s0") or "", "cd-wuhou-01",
        "vaccination", view.limits)])
    [claimed] = await ClaimScript(redis, stack_settings.code_secret)(rid, [ClaimRequest(
        claim_id, winner.account_id, winner.person_id, "s0", "", 19950101, "F", drawn=True)])
    assert reserved.status == "ok" and claimed.status == "ok"

    result = await drawn(api, rid)
    assert result["seed"] == str(seed) and result["seed_sha256"] == commitment
    assert recompute(result, commitment) == result["winners"] == verify(10, seed)[:3]
    holders = await redis.hgetall(keys.holders_key(rid))
    assert holders[winner.person_id.encode()] == claim_id.encode()
    assert len(holders) == 3 and await redis.hget(keys.taken_key(rid), "s0") == b"3"
    kinds = Counter(fields[b"type"] for _, fields in await redis.xrange(keys.outbox_key(rid)))
    assert kinds == {b"claim.confirmed": 3, b"lottery.lost": 7}


async def test_lottery_over_http_drawn_by_the_gateway_at_the_draw_time(api, redis,
                                                                      stack_settings):
    """Drawn at the draw time; the seed's SHA-256 public before any entry, the seed with
    the result, and a resident's recomputation (README) gives the winners, a skip too."""
    people = residents(stack_settings, 8)
    elsewhere = (await api.create_release(release_definition([1])))["release_id"]
    rid = (await api.create_release(release_definition([3], closes_in=4, mode="lottery"))
           )["release_id"]
    base = f"/v1/releases/{rid}/lottery"
    view = (await api.call("GET", base))[2]
    assert view["state"] == "open" and len(view["seed_sha256"]) == 64 and "seed" not in view
    assert (await api.claim(rid, people[0]))[2]["code"] == "lottery_release"
    for n, who in enumerate(people, 1):
        status, body = await enter(api, rid, who)
        assert (status, body["entry"]) == (201, n)
    seed = await committed_seed(redis, rid, stack_settings.code_secret)
    # Redis alone does not tell the seed: no value of any key holds it before the draw.
    assert str(seed).encode() not in await redis_dump(redis)
    # The first entry the draw picks already holds a booking that day at that clinic.
    unlucky = draw_order(8, seed)[0]
    assert (await api.claim(elsewhere, people[unlucky - 1]))[0] == 201
    status, body = await enter(api, rid, people[2])
    assert (status, body["entry"]) == (200, 3)
    status, _, body = await api.call("POST", f"/v1/admin/releases/{rid}/lottery/draw",
                                     headers=api.admin_headers)
    assert (status, body["code"]) == (409, "entries_open")
    assert (await api.call("GET", base))[2]["state"] == "open"

    result = await drawn(api, rid)
    assert result["entries"] == 8 and result["algorithm_text"].startswith("seed_sha256 =")
    assert result["skipped"] == [{"entry": unlucky, "reason": "limit_reached"}]
    assert recompute(result, view["seed_sha256"]) == result["winners"]
    assert result["winners"] == [n for n in verify(8, int(result["seed"])) if n != unlucky][:3]
    assert result["seed_sha256"] == view["seed_sha256"]
    assert result["committed_at_ms"] == view["committed_at_ms"]
    status, _, again = await api.call("POST", f"/v1/admin/releases/{rid}/lottery/draw",
                                      headers=api.admin_headers)
    assert status == 200 and again == result
    status, body = await enter(api, rid, residents(stack_settings, 1)[0])
    assert (status, body["code"]) == (410, "closed")
    for n in result["winners"]:
        status, _, body = await api.call(
            "GET", f"/v1/releases/{rid}/standby?person_id={people[n - 1].person_id}",
            headers=people[n - 1].headers)
        assert body["claim"]["status"] == "confirmed"

    plain = (await api.create_release(release_definition([1])))["release_id"]
    assert (await enter(api, plain, people[0]))[1]["code"] == "not_lottery"
