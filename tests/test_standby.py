"""The standby list: a cancelled slot in a sold-out release goes to the first person on
the list as a normal booking (with its SMS), never back on sale while someone there can
take it; a declined handover goes to the next; limits still hold; a handoff left half-way
by a dead gateway is finished by another."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest
from support import Api, Resident, release_definition, residents

from release_service.core import keys
from release_service.devtools.seed import seed_users
from release_service.modes.standby import StandbyList
from release_service.pipeline.outbox import parse_entry
from release_service.pipeline.reconcile import persisted_events
from release_service.releases.catalog import ReleaseCatalog
from release_service.scripts.cancel import CancelScript
from release_service.scripts.claim import ClaimScript
from release_service.scripts.reserve import ReserveScript
from release_service.scripts.standby import Refusal, StandbyScripts

SETTLE_SECONDS = 60


async def join(api: Api, release_id: str, who: Resident) -> tuple[int, dict]:
    status, _, body = await api.call("POST", f"/v1/releases/{release_id}/standby",
                                     json={"person_id": who.person_id}, headers=who.headers)
    return status, body


async def standing(api: Api, release_id: str, who: Resident) -> dict:
    status, _, body = await api.call(
        "GET", f"/v1/releases/{release_id}/standby?person_id={who.person_id}",
        headers=who.headers)
    assert status == 200, body
    return body


async def position(api: Api, release_id: str, who: Resident) -> int | None:
    return (await standing(api, release_id, who))["position"]


async def booking_of(api: Api, release_id: str, who: Resident) -> dict | None:
    """The person's confirmed booking in the release (from the claim it holds there)."""
    claim = (await standing(api, release_id, who)).get("claim")
    if claim is None:
        return None
    status, _, body = await api.call("GET", f"/v1/bookings/{claim['code']}",
                                     headers=who.headers)
    assert status == 200, body
    return body if body["status"] == "confirmed" else None


async def sold_out_with(api: Api, capacity: int, holders: list[Resident], **fields) -> str:
    release = await api.create_release(release_definition([capacity], **fields))
    rid = release["release_id"]
    results = await asyncio.gather(*(api.claim(rid, h) for h in holders))
    assert [status for status, _, _ in results] == [201] * len(holders)
    return rid


async def standby_list(redis, settings) -> StandbyList:
    """A gateway's standby list, to drive a handoff step by step."""
    catalog = ReleaseCatalog(redis, 1.0)
    await catalog.refresh()
    return StandbyList(redis, ClaimScript(redis, settings.code_secret), ReserveScript(redis),
                       catalog, 1800)


async def end(api: Api, code: str, who: Resident, action: str = "cancel") -> tuple[int, dict]:
    status, _, body = await api.call("POST", f"/v1/bookings/{code}/{action}",
                                     headers=who.headers)
    return status, body


async def test_cancelled_slot_reaches_the_first_on_standby_who_gets_the_sms(
        api, db, pipeline, redis, stack_settings, tmp_path):
    """Handed to the first on the list, declined to the next; a person a limit refuses is
    told by one SMS why; with the list empty the slot goes back on sale."""
    out = tmp_path / "users.jsonl"
    await seed_users(stack_settings, 6, out, progress=False)
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    h1, h2, s1, s2, s3, s4 = (Resident(r["account_id"], r["person_ids"][0], r["token"])
                              for r in rows)
    release = await api.create_release(release_definition([2]))
    rid = release["release_id"]
    assert (await api.claim(rid, h1))[0] == 201
    assert (await join(api, rid, s1))[1]["code"] == "not_sold_out"  # stock left: claim it
    claimed = (await api.claim(rid, h2))[2]

    assert await join(api, rid, s1) == (201, {"release_id": rid, "person_id": s1.person_id,
                                              "position": 1, "length": 1})
    assert (await join(api, rid, s2))[1]["position"] == 2
    assert (await join(api, rid, s1))[0] == 200  # one entry per person
    assert (await join(api, rid, h1))[1]["code"] == "already_claimed"
    assert await position(api, rid, s2) == 2 and await position(api, rid, s3) is None
    # s4 books the same day at the same clinic elsewhere (same_day_clinic is 1), then joins.
    other = await api.create_release(release_definition([1]))
    assert (await api.claim(other["release_id"], s4))[0] == 201
    assert (await join(api, rid, s4))[1]["position"] == 3

    first = await booking_of(api, rid, h1)
    assert first is not None
    status, body = await end(api, first["code"], h1)
    assert status == 200 and body["status"] == "cancelled"
    handed = await booking_of(api, rid, s1)
    assert handed is not None and handed["slot"]["slot_id"] == "s0"
    assert "decline_until" in await standing(api, rid, s1)
    assert await position(api, rid, s2) == 1 and await position(api, rid, s1) is None
    view = await api.admin_release(rid)
    assert view["remaining"] == 0  # never back on sale
    assert (await api.claim(rid, s3))[2]["code"] == "sold_out"

    # Ordinary bookings cannot be declined; the standby booking can, and moves on.
    assert (await end(api, claimed["code"], h2, "decline"))[1]["code"] == "not_declinable"
    assert (await end(api, handed["code"], s1, "decline"))[0] == 200
    second = await booking_of(api, rid, s2)
    assert second is not None and await booking_of(api, rid, s1) is None
    # s4, last on the list, is refused by the limit: skipped, and then the list is empty,
    # so the slot goes back on sale.
    assert (await end(api, claimed["code"], h2))[0] == 200
    assert (await api.admin_release(rid))["remaining"] == 1
    outbox = [parse_entry(rid, i, f) for i, f in await redis.xrange(keys.outbox_key(rid))]
    [skip] = [e for e in outbox if e.event_type == "standby.skipped"]  # before any trim
    place = await standing(api, rid, s4)
    assert place["position"] is None and "claim" not in place
    assert (place["left"]["reason"], place["left"]["detail"]) == ("limit_reached",
                                                                  "same_day_clinic")

    # Through relay, Kafka and both consumers: bookings rows and the SMS.
    expected = {handed["code"]: "cancelled", second["code"]: "confirmed",
                first["code"]: "cancelled", claimed["code"]: "cancelled"}
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        got = {r["code"].strip(): r["status"] for r in await db.fetch(
            "SELECT code, status FROM bookings WHERE release_id = $1", rid)}
        texts = [line["text"] for line in pipeline.sms_lines()]
        # 2 + 2 standby + 1 elsewhere, 3 cancellations, 1 skip notice
        if got == expected and len(texts) == 2 + 3 + 2 + 2:
            break
        await asyncio.sleep(0.25)
    assert got == expected
    phone_of = {r["account_id"]: r["phone"] for r in await db.fetch(
        "SELECT account_id, phone FROM accounts")}
    lines = pipeline.sms_lines()
    for who, booking in ((s1, handed), (s2, second)):
        [line] = [x for x in lines if x["message_id"] == booking["claim"]["claim_id"]
                  + ":confirmation"]
        assert line["phone"] == phone_of[who.account_id]
        assert booking["code"] in line["text"] and "候补成功" in line["text"]
    assert Counter(line["message_id"] for line in lines).most_common(1)[0][1] == 1
    [notice] = [line for line in lines if "候补名单" in line["text"]]
    assert notice["phone"] == phone_of[s4.account_id]
    assert "当天在该门诊已有预约" in notice["text"]
    assert notice["message_id"] == orjson.loads(skip.event)["claim_id"] + ":standby_skipped"
    async with db.acquire() as conn:  # reconcile may now trim the notice from the outbox
        assert skip.entry_id in await persisted_events(conn, [skip])


async def test_concurrent_cancellations_go_to_the_list_in_order(api, redis, stack_settings):
    holders = residents(stack_settings, 10)
    waiting = residents(stack_settings, 25)
    rid = await sold_out_with(api, 10, holders)
    joined = await asyncio.gather(*(join(api, rid, w) for w in waiting))
    assert sorted(body["position"] for _, body in joined) == list(range(1, 26))
    order = sorted(waiting, key=lambda w: dict(zip(
        [w.person_id for w in waiting], [b["position"] for _, b in joined], strict=True))[
            w.person_id])
    codes = [(await booking_of(api, rid, h))["code"] for h in holders]  # type: ignore[index]
    cancelled = await asyncio.gather(*(end(api, c, h) for c, h in zip(codes, holders,
                                                                       strict=True)))
    assert [status for status, _ in cancelled] == [200] * 10

    holding = await redis.hgetall(keys.holders_key(rid))
    assert {p.decode() for p in holding} == {w.person_id for w in order[:10]}
    assert await redis.hgetall(keys.taken_key(rid)) == {b"s0": b"10"}
    assert await redis.hget(keys.meta_key(rid), "left") == b"0"
    assert await redis.hlen(keys.handoffs_key(rid)) == 0
    assert [await position(api, rid, w) for w in order[10:]] == list(range(1, 16))


async def test_two_gateways_handing_on_at_once_skip_a_refused_person_once(
        api, redis, stack_settings):
    """Limits live on the person's own slot: checked when the slot is handed over. Two
    gateways hand the same slot on at once: the refused person leaves the list with one
    notice (the SMS's event) and the reason on their place; the next is booked."""
    holder, s1, s2 = residents(stack_settings, 3)
    rid = await sold_out_with(api, 1, [holder])
    for who in (s1, s2):
        assert (await join(api, rid, who))[0] == 201
    other = await api.create_release(release_definition([1]))
    assert (await api.claim(other["release_id"], s1))[0] == 201  # same day, same clinic
    claim_id = (await booking_of(api, rid, holder))["claim"]["claim_id"]  # type: ignore[index]
    assert (await CancelScript(redis)(rid, claim_id, holder.account_id)).held_for_standby
    gateways = [await standby_list(redis, stack_settings) for _ in range(2)]
    done = await asyncio.gather(*(g.hand_on(rid, claim_id) for g in gateways))
    assert "granted" in {d.status for d in done} <= {"granted", "gone"}

    booked = await booking_of(api, rid, s2)
    assert booked is not None and await booking_of(api, rid, s1) is None
    # The booking counts against s2's limits (neither gateway removed the reservation).
    assert await redis.hexists(keys.person_active_key(s2.person_id),
                               booked["claim"]["claim_id"])
    assert (await standing(api, rid, s1))["left"]["reason"] == "limit_reached"
    assert "left" not in await standing(api, rid, s2)
    events = [(f[b"type"], orjson.loads(f[b"e"])) for _, f in
              await redis.xrange(keys.outbox_key(rid))]
    assert [e["person_id"] for t, e in events if t == b"standby.skipped"] == [s1.person_id]
    assert await redis.zcard(keys.standby_key(rid)) == 0
    assert await redis.hgetall(keys.taken_key(rid)) == {b"s0": b"1"}


async def test_a_refusal_reported_after_another_gateway_booked_the_offer_keeps_it(
        api, redis, stack_settings):
    """Gateway A books the offer while gateway B's try of the same offer failed: B's
    refusal finds the booking and finishes the handoff; nobody is skipped or told."""
    holder, s1 = residents(stack_settings, 2)
    rid = await sold_out_with(api, 1, [holder])
    assert (await join(api, rid, s1))[0] == 201
    claim_id = (await booking_of(api, rid, holder))["claim"]["claim_id"]  # type: ignore[index]
    assert (await CancelScript(redis)(rid, claim_id, holder.account_id)).held_for_standby
    standby, scripts = await standby_list(redis, stack_settings), StandbyScripts(redis)
    step = await scripts.offer(rid, claim_id, "y" * 24)
    assert step.status == "offer" and step.offer is not None
    assert step.offer["person_id"] == s1.person_id
    assert await standby._book(rid, step.offer) is None  # gateway A
    step = await scripts.offer(rid, claim_id, "z" * 24,
                               Refusal("y" * 24, "already_claimed", ""))
    assert step.status == "granted" and step.claim is not None
    assert step.claim["claim_id"] == "y" * 24
    assert (await scripts.offer(rid, claim_id, "z" * 24)).status == "gone"
    types = [f[b"type"] for _, f in await redis.xrange(keys.outbox_key(rid))]
    assert b"standby.skipped" not in types
    assert "left" not in await standing(api, rid, s1)


@pytest.mark.parametrize("left_after", ["cancel", "offer"])
async def test_a_handoff_left_by_a_dead_gateway_is_finished(api, redis, stack_settings,
                                                            left_after):
    holder, s1, s2 = residents(stack_settings, 3)
    rid = await sold_out_with(api, 1, [holder])
    for who in (s1, s2):
        assert (await join(api, rid, who))[0] == 201
    claim_id = (await booking_of(api, rid, holder))["claim"]["claim_id"]  # type: ignore[index]
    # The gateway's first step only, then it "dies".
    outcome = await CancelScript(redis)(rid, claim_id, holder.account_id)
    assert outcome.held_for_standby
    standby = await standby_list(redis, stack_settings)
    if left_after == "offer":
        assert (await StandbyScripts(redis).offer(rid, claim_id, "c" * 24)).status == "offer"
    assert await booking_of(api, rid, s1) is None
    assert (await api.claim(rid, s2))[2]["code"] == "sold_out"  # held, not on sale

    catalog = ReleaseCatalog(redis, 1.0)
    await catalog.refresh()
    assert await standby.resume(rid, 0, catalog.now_ms()) == 1
    booked = await booking_of(api, rid, s1)
    assert booked is not None
    if left_after == "offer":
        assert booked["claim"]["claim_id"] == "c" * 24  # the offer recorded, resumed as is
    assert await standby.resume(rid, 0, catalog.now_ms()) == 0
    assert await redis.hgetall(keys.taken_key(rid)) == {b"s0": b"1"}
    assert await position(api, rid, s2) == 1
