"""The booking lifecycle and the platform's rules, at their boundaries, against the real
gateway, Redis and PostgreSQL. Times are explicit (relative to now); nothing sleeps."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from support import CLINIC_ZONE, Api, Resident, release_definition, residents

from consumers.bookings import BookingEvent, BookingsProcessor
from release_service.bookings.attendance import add_months, no_show_pass
from release_service.core import keys
from release_service.people.resident_id import generate_resident_id

SHANGHAI = ZoneInfo("Asia/Shanghai")


def slots_at(start: datetime, capacity: int = 5, count: int = 1) -> list[dict]:
    return [{"slot_id": f"s{i}", "starts_at": (start + timedelta(hours=i)).isoformat(),
             "ends_at": (start + timedelta(hours=i, minutes=30)).isoformat(),
             "capacity": capacity} for i in range(count)]


def release_on(day_offset: int, clinic: str = "cd-wuhou-01", capacity: int = 5,
               **fields) -> dict:
    """A release open now whose slot is `day_offset` days ahead at 10:00 clinic time."""
    day = datetime.now(SHANGHAI).date() + timedelta(days=day_offset)
    start = datetime(day.year, day.month, day.day, 10, tzinfo=SHANGHAI)
    return release_definition([capacity], clinic_id=clinic, slots=slots_at(start, capacity),
                              **fields)


async def claim_ok(api: Api, release_id: str, who: Resident, **kw) -> dict:
    status, _, body = await api.claim(release_id, who, **kw)
    assert status == 201, body
    return body


# -- cancellation ------------------------------------------------------------------------

async def test_cancel_the_minute_before_the_deadline_and_not_the_minute_after(api, stack_settings):
    now = datetime.now(UTC)
    open_one = await api.create_release(release_definition(
        [3], slots=slots_at(now + timedelta(hours=24, minutes=1), capacity=3)))
    late_one = await api.create_release(release_definition(
        [3], slots=slots_at(now + timedelta(hours=24, minutes=-1), capacity=3)))
    alice, bob = residents(stack_settings, 2)

    early = await claim_ok(api, open_one["release_id"], alice)
    late = await claim_ok(api, late_one["release_id"], bob)

    status, _, body = await api.call("POST", f"/v1/bookings/{late['code']}/cancel",
                                     headers=bob.headers)
    assert (status, body["code"]) == (409, "cancel_deadline_passed")
    assert (await api.admin_release(late_one["release_id"]))["remaining"] == 2

    status, _, body = await api.call("POST", f"/v1/bookings/{early['code']}/cancel",
                                     headers=alice.headers)
    assert status == 200 and body["status"] == "cancelled"
    assert (await api.admin_release(open_one["release_id"]))["remaining"] == 3
    status, _, body = await api.call("POST", f"/v1/bookings/{early['code']}/cancel",
                                     headers=alice.headers)
    assert (status, body["code"]) == (409, "already_cancelled")
    view = await api.admin_release(open_one["release_id"])
    assert view["remaining"] == 3 and view["cancelled"] == 1


async def test_time_of_day_deadline_on_the_day_before(api, stack_settings):
    soon = datetime.now(SHANGHAI) + timedelta(minutes=1)
    slot_day = soon.date() + timedelta(days=1)
    start = datetime(slot_day.year, slot_day.month, slot_day.day, 18, tzinfo=SHANGHAI)
    allowed = await api.create_release(release_definition(
        [2], slots=slots_at(start, 2), cancellation={"day_before_at": f"{soon:%H:%M:%S}"}))
    past = soon - timedelta(minutes=2)
    closed = await api.create_release(release_definition(
        [2], slots=slots_at(start, 2), cancellation={"day_before_at": f"{past:%H:%M:%S}"},
        clinic_id="cd-other"))
    who, = residents(stack_settings, 1)
    a = await claim_ok(api, allowed["release_id"], who)
    b = await claim_ok(api, closed["release_id"], who)
    assert (await api.call("POST", f"/v1/bookings/{b['code']}/cancel",
                           headers=who.headers))[0] == 409
    assert (await api.call("POST", f"/v1/bookings/{a['code']}/cancel",
                           headers=who.headers))[0] == 200


async def test_never_on_the_day_of_the_slot(api, stack_settings):
    # hours_before 0 would allow cancelling until the start; the same-day rule forbids it.
    now = datetime.now(SHANGHAI)
    start = max(now + timedelta(minutes=5), now.replace(hour=23, minute=50))
    if start.date() != now.date():  # it is 23:55 already: the slot moves to tomorrow's day
        start = now + timedelta(minutes=5)
    release = await api.create_release(release_definition(
        [1], slots=slots_at(start, 1), cancellation={"hours_before": 0}))
    who, = residents(stack_settings, 1)
    claim = await claim_ok(api, release["release_id"], who)
    status, _, body = await api.call("POST", f"/v1/bookings/{claim['code']}/cancel",
                                     headers=who.headers)
    assert (status, body["code"]) == (409, "cancel_deadline_passed")


async def test_cancel_then_another_person_takes_the_slot_and_the_first_may_claim_again(
    api, stack_settings
):
    release = await api.create_release(release_on(3))
    rid = release["release_id"]
    first, second, third, fourth, fifth, sixth = residents(stack_settings, 6)
    taken = [await claim_ok(api, rid, p) for p in (first, second, third, fourth, fifth)]
    assert (await api.claim(rid, sixth))[2]["code"] == "sold_out"
    assert (await api.call("POST", f"/v1/bookings/{taken[0]['code']}/cancel",
                           headers=first.headers))[0] == 200
    again = await claim_ok(api, rid, sixth)  # the sold-out view cleared at once
    assert again["slot_id"] == taken[0]["slot_id"] and again["code"] != taken[0]["code"]
    assert (await api.claim(rid, first))[2]["code"] == "sold_out"  # freed, but stock is gone


# -- lookups and BOLA ----------------------------------------------------------------------

async def test_a_code_just_given_is_found_and_only_by_its_owner(api, stack_settings):
    release = await api.create_release(release_on(2))
    owner, intruder = residents(stack_settings, 2)
    claim = await claim_ok(api, release["release_id"], owner)
    status, _, body = await api.call("GET", f"/v1/bookings/{claim['code']}",
                                     headers=owner.headers)
    assert status == 200 and body["claim"] == claim and body["persisted"] is False

    unknown = await api.call("GET", "/v1/bookings/00000000", headers=intruder.headers)
    for method, path in (("GET", ""), ("POST", "/cancel"), ("POST", "/resend-sms")):
        status, _, body = await api.call(method, f"/v1/bookings/{claim['code']}{path}",
                                         headers=intruder.headers)
        assert status == 404 and body["code"] == "not_found"
        assert {k: v for k, v in body.items() if k != "detail"} == \
            {k: v for k, v in unknown[2].items() if k != "detail"}
        assert body["detail"] == unknown[2]["detail"]
    assert (await api.admin_release(release["release_id"]))["remaining"] == 4


async def test_bookings_list_and_lookup_from_postgresql(api, stack_settings):
    release = await api.create_release(release_on(2))
    who, = residents(stack_settings, 1)
    claim = await claim_ok(api, release["release_id"], who)
    await persist(stack_settings, [claim], who)
    status, _, listing = await api.call("GET", "/v1/bookings", headers=who.headers)
    assert status == 200 and [b["code"] for b in listing] == [claim["code"]]
    assert listing[0]["persisted"] is True and listing[0]["slot"]["slot_id"] == "s0"


async def persist(settings, claims: list[dict], who: Resident) -> None:
    """What the bookings consumer does, applied directly."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await BookingsProcessor(pool).handle([
            BookingEvent("claim", c["claim_id"], c["code"], c["release_id"], c["slot_id"],
                         c["person_id"], who.account_id,
                         datetime.fromisoformat(c["claimed_at"]), None) for c in claims])
    finally:
        await pool.close()


# -- limits ----------------------------------------------------------------------------------

async def test_same_day_same_clinic_and_per_day(api, stack_settings):
    who, = residents(stack_settings, 1)
    a = await api.create_release(release_on(4, "clinic-a"))
    a2 = await api.create_release(release_on(4, "clinic-a"))
    b = await api.create_release(release_on(4, "clinic-b"))
    c = await api.create_release(release_on(4, "clinic-c"))
    await claim_ok(api, a["release_id"], who)
    status, _, body = await api.claim(a2["release_id"], who)
    assert (status, body["code"], body["limit"]) == (403, "limit_reached", "same_day_clinic")
    await claim_ok(api, b["release_id"], who)  # the 2nd of the day
    status, _, body = await api.claim(c["release_id"], who)  # the 3rd
    assert (status, body["limit"]) == (403, "per_day")
    assert (await api.admin_release(c["release_id"]))["remaining"] == 5


async def test_per_7_days_then_per_3_months(api, stack_settings):
    who, = residents(stack_settings, 1)
    weekly = [await api.create_release(release_on(5 + i, f"c{i}")) for i in range(4)]
    for release in weekly[:3]:
        await claim_ok(api, release["release_id"], who)
    status, _, body = await api.claim(weekly[3]["release_id"], who)
    assert (status, body["limit"]) == (403, "per_7_days")

    other, = residents(stack_settings, 1)
    relaxed = [await api.create_release(release_on(5 + i, f"q{i}", limits={"per_7_days": -1}))
               for i in range(6)]
    for release in relaxed[:5]:
        await claim_ok(api, release["release_id"], other)  # the 5th in 3 months is fine
    status, _, body = await api.claim(relaxed[5]["release_id"], other)  # the 6th is not
    assert (status, body["limit"]) == (403, "per_3_months")


async def test_concurrent_claims_in_two_releases_never_both_pass_a_limit_of_1(
    api, stack_settings
):
    first = await api.create_release(release_on(6, "clinic-x", capacity=50))
    second = await api.create_release(release_on(6, "clinic-x", capacity=50))
    people = residents(stack_settings, 40)
    results = await asyncio.gather(*(
        asyncio.gather(api.claim(first["release_id"], p), api.claim(second["release_id"], p))
        for p in people))
    for a, b in results:
        assert sorted([a[0], b[0]]) == [201, 403]
    remaining = [(await api.admin_release(r["release_id"]))["remaining"]
                 for r in (first, second)]
    assert sum(50 - r for r in remaining) == 40  # each of the 40 won exactly one


async def test_cancelling_frees_the_limit(api, stack_settings):
    who, = residents(stack_settings, 1)
    a = await api.create_release(release_on(8, "clinic-a"))
    a2 = await api.create_release(release_on(8, "clinic-a"))
    claim = await claim_ok(api, a["release_id"], who)
    assert (await api.claim(a2["release_id"], who))[0] == 403
    assert (await api.call("POST", f"/v1/bookings/{claim['code']}/cancel",
                           headers=who.headers))[0] == 200
    await claim_ok(api, a2["release_id"], who)


# -- check-in, no-shows and bans ---------------------------------------------------------------

async def test_check_in_and_then_nothing_more_to_cancel(api, stack_settings):
    release = await api.create_release(release_on(2))
    who, = residents(stack_settings, 1)
    claim = await claim_ok(api, release["release_id"], who)
    status, _, body = await api.call("POST", f"/v1/admin/bookings/{claim['code']}/check-in",
                                     headers=api.admin_headers)
    assert status == 404  # not persisted yet
    await persist(stack_settings, [claim], who)
    status, _, body = await api.call("POST", f"/v1/admin/bookings/{claim['code']}/check-in",
                                     headers=api.admin_headers)
    assert status == 200 and body["status"] == "attended"
    assert (await api.call("POST", f"/v1/admin/bookings/{claim['code']}/check-in",
                           headers=api.admin_headers))[0] == 409
    status, _, body = await api.call("POST", f"/v1/bookings/{claim['code']}/cancel",
                                     headers=who.headers)
    assert (status, body["code"]) == (409, "not_cancellable")


async def past_no_shows(settings, person_id: str, count: int, before: datetime) -> None:
    """`count` confirmed bookings of the person in slots that ended shortly before
    `before` (same calendar year)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        for i in range(count):
            rid = f"past-{person_id}-{i}"
            start = before - timedelta(hours=i + 2)
            await conn.execute(
                "INSERT INTO releases (release_id, vaccine, dose, clinic_id, department, "
                "opens_at, closes_at, definition) VALUES ($1, 'HPV9', 1, 'c', 'd', $2, $3, "
                "'{}')", rid, start - timedelta(days=9), start - timedelta(days=8))
            await conn.execute("INSERT INTO slots VALUES ($1, 's0', $2, $3, 1)", rid, start,
                               start + timedelta(minutes=30))
            await conn.execute(
                "INSERT INTO bookings (claim_id, code, release_id, slot_id, person_id, "
                "account_id, claimed_at) VALUES ($1, $2, $3, 's0', $4, 'acct', $5)",
                f"{rid}-claim", f"{random.randrange(10**8):08d}", rid, person_id,
                start - timedelta(days=8))
    finally:
        await conn.close()


async def run_no_shows(settings, redis, now: datetime) -> dict:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return await no_show_pass(pool, redis, now, SHANGHAI)
    finally:
        await pool.close()


@pytest.mark.parametrize(("no_shows", "months"), [(2, 0), (3, 3), (5, 3), (6, 6)])
async def test_no_shows_in_a_calendar_year_ban(redis, stack_settings, no_shows, months):
    person = f"p-{no_shows}"
    at = datetime(datetime.now(SHANGHAI).year - 1, 12, 31, 12, tzinfo=SHANGHAI)
    await past_no_shows(stack_settings, person, no_shows, at)
    result = await run_no_shows(stack_settings, redis, at)
    assert result == {"no_shows": no_shows, "bans": 1 if months else 0}
    assert await run_no_shows(stack_settings, redis, at) == {"no_shows": 0, "bans": 0}
    conn = await asyncpg.connect(stack_settings.database_url)
    try:
        bans = await conn.fetch("SELECT until, no_shows FROM bans WHERE person_id = $1", person)
        statuses = await conn.fetch("SELECT DISTINCT status FROM bookings WHERE person_id = $1",
                                    person)
    finally:
        await conn.close()
    assert [s["status"] for s in statuses] == ["no_show"]
    assert [(b["until"], b["no_shows"]) for b in bans] == (
        [(add_months(at, months), no_shows)] if months else [])


async def test_no_shows_in_different_calendar_years_do_not_add_up(redis, stack_settings):
    this_year = datetime(datetime.now(SHANGHAI).year, 1, 1, 8, tzinfo=SHANGHAI)
    await past_no_shows(stack_settings, "p-split", 2, this_year - timedelta(days=2))
    await run_no_shows(stack_settings, redis, this_year - timedelta(days=1))
    await past_no_shows(stack_settings, "p-split-b", 0, this_year)
    conn = await asyncpg.connect(stack_settings.database_url)
    try:
        await conn.execute(
            "UPDATE bookings SET person_id = 'p-split' WHERE person_id = 'p-split-b'")
        rid = "past-p-split-new"
        await conn.execute(
            "INSERT INTO releases (release_id, vaccine, dose, clinic_id, department, "
            "opens_at, closes_at, definition) VALUES ($1, 'HPV9', 1, 'c', 'd', $2, $3, '{}')",
            rid, this_year - timedelta(days=9), this_year - timedelta(days=8))
        await conn.execute("INSERT INTO slots VALUES ($1, 's0', $2, $3, 1)", rid,
                           this_year, this_year + timedelta(minutes=30))
        await conn.execute(
            "INSERT INTO bookings (claim_id, code, release_id, slot_id, person_id, account_id, "
            "claimed_at) VALUES ('new-claim', '12121212', $1, 's0', 'p-split', 'acct', $2)",
            rid, this_year - timedelta(days=8))
    finally:
        await conn.close()
    # The 3rd no-show overall, but the 1st of this calendar year: no ban.
    result = await run_no_shows(stack_settings, redis, this_year + timedelta(hours=2))
    assert result == {"no_shows": 1, "bans": 0}


async def test_a_ban_holds_on_its_last_day_and_is_lifted_after(api, redis, stack_settings):
    release = await api.create_release(release_on(3))
    banned, freed = residents(stack_settings, 2)
    now = datetime.now(SHANGHAI)
    # The third no-show evaluated so that the 3-month ban ends in a day / ended a minute ago.
    last_day = add_months(now, -3) + timedelta(days=1)
    over = add_months(now, -3) - timedelta(minutes=1)
    for who, at in ((banned, last_day), (freed, over)):
        await past_no_shows(stack_settings, who.person_id, 3, at)
        assert (await run_no_shows(stack_settings, redis, at))["bans"] == 1
    status, _, body = await api.claim(release["release_id"], banned)
    assert (status, body["code"]) == (403, "banned")
    assert body["banned_until"].startswith(f"{add_months(last_day, 3):%Y-%m-%d}")
    await claim_ok(api, release["release_id"], freed)


# -- registration, login and family members ----------------------------------------------------

def sink_code(settings, phone: str) -> str:
    lines = [orjson.loads(x) for x in Path(settings.sms_sink_path).read_bytes().splitlines()]
    text = next(x["text"] for x in reversed(lines) if x["phone"] == phone)
    return next(word for word in text.replace("，", " ").split() if word.isdigit())


def new_phone() -> str:
    return f"139{random.randrange(10**8):08d}"


def new_id(rng: random.Random, age: int = 30, sex: str = "F") -> str:
    today = date.today()
    return generate_resident_id(rng, date(today.year - age, 3, 3), sex)


async def sign_in(api: Api, settings, phone: str, **fields) -> tuple[int, dict]:
    assert (await api.call("POST", "/v1/otp", json={"phone": phone}))[0] == 202
    code = sink_code(settings, phone)
    status, _, body = await api.call("POST", "/v1/sessions",
                                     json={"phone": phone, "code": code, **fields})
    return status, body


async def test_register_login_and_one_phone_backs_two_users(api, redis, stack_settings):
    rng = random.Random(11)
    phone = new_phone()
    status, first = await sign_in(api, stack_settings, phone, real_name="王芳",
                                  id_number=new_id(rng))
    assert status == 201 and first["registered"] and len(first["persons"]) == 1
    assert first["persons"][0]["id_number"].count("*") == 13  # masked in answers
    # Cool-down: a second code for the same phone a moment later is refused.
    status, headers, body = await api.call("POST", "/v1/otp", json={"phone": phone})
    assert (status, body["code"]) == (429, "rate_limited") and "Retry-After" in headers

    second_phone_user = new_id(rng, 60, "M")
    await _clear_cooldown(redis, phone)
    status, second = await sign_in(api, stack_settings, phone, real_name="王强",
                                   id_number=second_phone_user)
    assert status == 201 and second["account_id"] != first["account_id"]
    await _clear_cooldown(redis, phone)
    status, third = await sign_in(api, stack_settings, phone, real_name="王五",
                                  id_number=new_id(rng, 40))
    assert (status, third["code"]) == (409, "phone_limit")
    await _clear_cooldown(redis, phone)
    status, again = await sign_in(api, stack_settings, phone, id_number=second_phone_user)
    assert status == 200 and again["account_id"] == second["account_id"]


async def _clear_cooldown(redis, phone: str) -> None:
    """Tests skip the 60-second cool-down by removing its key, not by sleeping."""
    await redis.delete(keys.otp_cooldown_key(phone))


async def test_bad_registration_input(api, stack_settings):
    phone = new_phone()
    assert (await api.call("POST", "/v1/otp", json={"phone": "12345"}))[0] == 422
    status, body = await sign_in(api, stack_settings, phone, real_name="李四",
                                 id_number="110105194912310021")
    assert (status, body["code"]) == (422, "invalid")  # checksum


async def test_otp_single_use_and_brute_force_burns_it(api, stack_settings):
    rng = random.Random(12)
    phone = new_phone()
    assert (await api.call("POST", "/v1/otp", json={"phone": phone}))[0] == 202
    code = sink_code(stack_settings, phone)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):
        status, _, _ = await api.call("POST", "/v1/sessions", json={
            "phone": phone, "code": wrong, "real_name": "赵六", "id_number": new_id(rng)})
        assert status == 401
    status, _, _ = await api.call("POST", "/v1/sessions", json={
        "phone": phone, "code": code, "real_name": "赵六", "id_number": new_id(rng)})
    assert status == 401  # burned: the right code no longer works

    other = new_phone()
    status, _ = await sign_in(api, stack_settings, other, real_name="赵七",
                                 id_number=new_id(rng))
    assert status == 201
    reused = await api.call("POST", "/v1/sessions", json={
        "phone": other, "code": sink_code(stack_settings, other)})
    assert reused[0] == 401  # a code works once


async def test_family_members(api, stack_settings):
    rng = random.Random(13)
    status, account = await sign_in(api, stack_settings, new_phone(), real_name="陈母",
                                    id_number=new_id(rng, 35))
    headers = {"Authorization": f"Bearer {account['token']}"}
    child_id = new_id(rng, 10)
    status, _, added = await api.call("POST", "/v1/persons", headers=headers,
                                      json={"real_name": "陈小", "id_number": child_id})
    assert status == 201 and len(added["persons"]) == 2
    status, _, body = await api.call("POST", "/v1/persons", headers=headers,
                                     json={"real_name": "陈小", "id_number": child_id})
    assert (status, body["code"]) == (409, "already_exists")
    token = added["token"]
    for age in (5, 62, 70):
        status, _, added = await api.call(
            "POST", "/v1/persons", headers={"Authorization": f"Bearer {token}"},
            json={"real_name": "陈家", "id_number": new_id(rng, age, "M")})
        assert status == 201
        token = added["token"]
    headers = {"Authorization": f"Bearer {token}"}
    status, _, body = await api.call("POST", "/v1/persons", headers=headers,
                                     json={"real_name": "陈六", "id_number": new_id(rng, 8)})
    assert (status, body["code"]) == (409, "person_limit")
    persons = (await api.call("GET", "/v1/persons", headers=headers))[2]
    assert len(persons) == 5
    holder = next(p for p in persons if p["is_holder"])
    child = next(p for p in persons if not p["is_holder"])

    # The child books with the parent's new token; then cannot be removed until cancelled.
    release = await api.create_release(release_on(3, eligibility={"max_age": 12}))
    me = Resident(account["account_id"], child["person_id"], token)
    claim = await claim_ok(api, release["release_id"], me)
    status, _, body = await api.call("DELETE", f"/v1/persons/{child['person_id']}",
                                     headers=headers)
    assert (status, body["code"]) == (409, "has_active_booking")
    assert (await api.call("DELETE", f"/v1/persons/{holder['person_id']}",
                           headers=headers))[0] == 409
    assert (await api.call("POST", f"/v1/bookings/{claim['code']}/cancel",
                           headers=headers))[0] == 200
    status, _, body = await api.call("DELETE", f"/v1/persons/{child['person_id']}",
                                     headers=headers)
    assert status == 200 and len(body["persons"]) == 4
    # The old token still names the child; the claim path refuses it all the same.
    status, _, body = await api.claim(release["release_id"], me)
    assert (status, body["code"]) == (403, "not_your_person")


async def test_rules_use_the_clinic_zone(api, stack_settings):
    # A slot at 00:30 Shanghai time is on that Shanghai day, whatever UTC says.
    day = datetime.now(SHANGHAI).date() + timedelta(days=9)
    start = datetime(day.year, day.month, day.day, 0, 30, tzinfo=SHANGHAI)
    release = await api.create_release(release_definition([1], slots=slots_at(start, 1)))
    assert release["slots"][0]["visit_day"] == f"{day:%Y%m%d}"
    assert release["slots"][0]["cancel_until"].startswith(f"{day - timedelta(days=1)}")
    assert CLINIC_ZONE.utcoffset(None) == timedelta(hours=8)
