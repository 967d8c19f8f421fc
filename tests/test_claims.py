"""The claim path over HTTP against the real gateway, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from support import Api, release_definition, residents

from release_service.core import keys
from release_service.people.tokens import PersonGrant, TokenCodec


async def spike(api: Api, release_id: str, people: list, *, keyed: bool) -> list:
    """Every resident claims at once (a third name a slot); keyed ones also send a
    duplicate with the same Idempotency-Key at the same moment."""
    jobs = []
    for i, resident in enumerate(people):
        slot = f"s{i % 3}" if i % 3 == 0 else None
        if keyed and i % 2 == 0:
            key = f"k-{resident.person_id}"
            jobs.append(("key", resident, api.claim(release_id, resident, slot_id=slot, key=key)))
            jobs.append(("key", resident, api.claim(release_id, resident, slot_id=slot, key=key)))
        else:
            jobs.append(("plain", resident, api.claim(release_id, resident, slot_id=slot)))
    random.Random(7).shuffle(jobs)
    results = await asyncio.gather(*(job for _, _, job in jobs))
    return [(kind, resident, result)
            for (kind, resident, _), result in zip(jobs, results, strict=True)]


async def check_sold_exactly(api: Api, redis: Redis, release_id: str, results: list) -> None:
    created = [body for _, _, (status, _, body) in results if status == 201]
    statuses = {status for _, _, (status, _, _) in results}
    assert statuses <= {201, 409}, statuses
    by_claim = {body["claim_id"]: body for body in created}
    assert len(by_claim) == 200
    persons = [body["person_id"] for body in by_claim.values()]
    assert len(set(persons)) == 200
    codes = [body["code"] for body in by_claim.values()]
    assert len(set(codes)) == 200
    assert all(len(code) == 8 and code.isdigit() for code in codes)

    view = await api.admin_release(release_id)
    assert view["remaining"] == 0
    assert [s["remaining"] for s in view["slots"]] == [0, 0, 0]
    assert [s["claimed"] for s in view["slots"]] == [s["capacity"] for s in view["slots"]]
    taken = await redis.hgetall(keys.taken_key(release_id))
    assert sorted(int(v) for v in taken.values()) == [60, 70, 70]
    assert await redis.xlen(keys.outbox_key(release_id)) == 200
    assert await redis.hlen(keys.claims_key(release_id)) == 200


async def test_spike_of_5000_takes_exactly_200(api, redis, stack_settings):
    release = await api.create_release(release_definition([70, 70, 60]))
    people = residents(stack_settings, 5000)
    results = await spike(api, release["release_id"], people, keyed=False)
    await check_sold_exactly(api, redis, release["release_id"], results)


async def test_spike_with_retried_keys_still_200_and_replays_identical(
    api, redis, stack_settings
):
    release = await api.create_release(release_definition([70, 70, 60]))
    people = residents(stack_settings, 5000)
    results = await spike(api, release["release_id"], people, keyed=True)
    await check_sold_exactly(api, redis, release["release_id"], results)

    by_person: dict[str, list] = {}
    for kind, resident, (status, headers, body) in results:
        if kind == "key":
            by_person.setdefault(resident.person_id, []).append((status, headers, body))
    replays = 0
    for answers in by_person.values():
        assert len(answers) == 2
        (s1, h1, b1), (s2, h2, b2) = answers
        if s1 == 201 or s2 == 201:
            # A twin that won: both are the same 201, one of them marked as the replay.
            assert s1 == s2 == 201 and b1 == b2
            flags = sorted(h.get("Idempotent-Replayed", "") for h in (h1, h2))
            assert flags == ["", "true"]
            replays += 1
    assert replays > 0
    # Asking again later replays too, even though the release is now sold out.
    _, resident, (status, _, body) = next(r for r in results if r[0] == "key" and r[2][0] == 201)
    again = await api.claim(release["release_id"], resident, key=f"k-{resident.person_id}")
    assert again[0] == 201 and again[2] == body and again[1]["Idempotent-Replayed"] == "true"


async def test_a_spike_for_any_slot_sells_every_visit_day(api, redis, stack_settings):
    """Claims naming no slot take the first visit day with stock in the gateway's view,
    which lags the script's: when that day sold out meanwhile, the claim follows the
    stock to another day. No resident hears "sold out" while any day has a slot left."""
    definition = release_definition([])
    day = datetime.now(UTC).replace(hour=2, minute=0, second=0, microsecond=0)
    definition["slots"] = [
        {"slot_id": f"d{i}", "starts_at": (day + timedelta(days=7 + i)).isoformat(),
         "ends_at": (day + timedelta(days=7 + i, hours=1)).isoformat(), "capacity": 25}
        for i in range(4)]
    rid = (await api.create_release(definition))["release_id"]
    people = residents(stack_settings, 1500)

    results = await asyncio.gather(*(api.claim(rid, resident) for resident in people))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {201, 409} and statuses.count(201) == 100, set(statuses)
    view = await api.admin_release(rid)
    assert (view["claimed"], view["remaining"]) == (100, 0)
    assert [slot["claimed"] for slot in view["slots"]] == [25] * 4
    assert await redis.hlen(keys.holders_key(rid)) == 100
    # Every person's reservation (their limits) names the day of the slot they won.
    by_slot = {body["person_id"]: body["slot_id"] for status, _, body in results
               if status == 201}
    visit_day = {slot["slot_id"]: slot["visit_day"] for slot in view["slots"]}
    for person_id, slot_id in by_slot.items():
        [entry] = (await redis.hgetall(keys.person_active_key(person_id))).values()
        assert entry.decode().split("|")[1] == visit_day[slot_id]


async def test_waves_release_their_share_at_their_time(api, stack_settings):
    opens_in = 1.5
    definition = release_definition([4], opens_in=opens_in)
    first, second = definition["opens_at"], _shift(definition["opens_at"], 2.0)
    definition["waves"] = [{"opens_at": first, "share": 0.5}, {"opens_at": second, "share": 0.5}]
    release = await api.create_release(definition)
    rid = release["release_id"]
    people = residents(stack_settings, 6)
    started = time.monotonic()

    status, headers, body = await api.claim(rid, people[0])
    assert status == 425 and body["code"] == "not_open" and int(headers["Retry-After"]) >= 1

    await asyncio.sleep(max(0.0, opens_in - (time.monotonic() - started)) + 0.3)
    assert (await api.claim(rid, people[0]))[0] == 201
    assert (await api.claim(rid, people[1]))[0] == 201
    status, _, body = await api.claim(rid, people[2])
    assert status == 409 and body["code"] == "sold_out" and "next_wave_at_ms" in body

    await asyncio.sleep(max(0.0, opens_in + 2.0 - (time.monotonic() - started)) + 0.3)
    assert (await api.claim(rid, people[2]))[0] == 201
    assert (await api.claim(rid, people[3]))[0] == 201
    status, _, body = await api.claim(rid, people[4])
    assert status == 409 and body["code"] == "sold_out" and "next_wave_at_ms" not in body


async def test_pause_resume_close(api, stack_settings):
    release = await api.create_release(release_definition([10]))
    rid = release["release_id"]
    people = residents(stack_settings, 4)
    admin = api.admin_headers

    status, _, body = await api.call("POST", f"/v1/admin/releases/{rid}/pause", headers=admin)
    assert status == 200 and body["state"] == "paused"
    status, headers, body = await api.claim(rid, people[0])
    assert status == 425 and body["code"] == "paused" and "Retry-After" in headers
    # The script refuses too, for a keyed request that skips the local view.
    status, _, body = await api.claim(rid, people[0], key="k1")
    assert status == 425 and body["code"] == "paused"

    await api.call("POST", f"/v1/admin/releases/{rid}/resume", headers=admin)
    assert (await api.claim(rid, people[0]))[0] == 201

    await api.call("POST", f"/v1/admin/releases/{rid}/close", headers=admin)
    status, _, body = await api.claim(rid, people[1])
    assert status == 410 and body["code"] == "closed"
    status, _, body = await api.claim(rid, people[1], key="k2")
    assert status == 410 and body["code"] == "closed"
    view = await api.admin_release(rid)
    assert view["remaining"] == 9


async def test_refusals_change_no_stock(api, redis, stack_settings):
    definition = release_definition([1, 1], eligibility={"min_age": 9, "max_age": 45, "sex": "F"})
    release = await api.create_release(definition)
    rid = release["release_id"]
    codec = TokenCodec(stack_settings.token_secret, stack_settings.token_ttl_seconds)
    woman, = residents(stack_settings, 1)
    man, = residents(stack_settings, 1, sex="M")
    elder, = residents(stack_settings, 1, birth=19500101)

    status, _, body = await api.claim(rid, man)
    assert (status, body["code"]) == (403, "not_eligible")
    status, _, body = await api.claim(rid, elder)
    assert (status, body["code"]) == (403, "not_eligible")
    status, _, body = await api.claim(rid, woman, person_id=man.person_id)
    assert (status, body["code"]) == (403, "not_your_person")
    status, _, body = await api.claim("no-such-release", woman)
    assert (status, body["code"]) == (404, "not_found")
    status, _, body = await api.claim(rid, woman, slot_id="nope")
    assert (status, body["code"]) == (404, "not_found")

    expired = codec.issue(woman.account_id, [PersonGrant(woman.person_id, 19950101, "F")],
                          now=time.time() - 10 * stack_settings.token_ttl_seconds)
    tampered = woman.token[:-3] + ("AAA" if not woman.token.endswith("AAA") else "BBB")
    for token in (expired, tampered, "not-a-jwt"):
        status, _, body = await api.call(
            "POST", f"/v1/releases/{rid}/claims", json={"person_id": woman.person_id},
            headers={"Authorization": f"Bearer {token}"})
        assert (status, body["code"]) == (401, "unauthorized")
    status, _, body = await api.call("POST", f"/v1/releases/{rid}/claims",
                                     json={"person_id": woman.person_id})
    assert (status, body["code"]) == (401, "unauthorized")
    assert (await api.admin_release(rid))["remaining"] == 2

    assert (await api.claim(rid, woman, slot_id="s0"))[0] == 201
    status, _, body = await api.claim(rid, woman, slot_id="s1")
    assert (status, body["code"]) == (409, "already_claimed")
    other, = residents(stack_settings, 1)
    status, _, body = await api.claim(rid, other, slot_id="s0")
    assert (status, body["code"]) == (409, "sold_out")
    assert (await api.admin_release(rid))["remaining"] == 1
    assert await redis.xlen(keys.outbox_key(rid)) == 1


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "bad_request"),
        (b"[1, 2]", 422, "invalid"),
        (b'{"person_id": 12}', 422, "invalid"),
        (b'{"person_id": "p", "slot_id": ["s0"]}', 422, "invalid"),
        (b'{}', 422, "invalid"),
        (b'{"person_id": "' + b"x" * 40_000 + b'"}', 413, "too_large"),
    ],
)
async def test_bad_claim_bodies(api, stack_settings, payload, status, code):
    release = await api.create_release(release_definition([3]))
    resident, = residents(stack_settings, 1)
    got, _, body = await api.call(
        "POST", f"/v1/releases/{release['release_id']}/claims", data=payload,
        headers={**resident.headers, "Content-Type": "application/json"})
    assert (got, body["code"]) == (status, code)
    assert body["status"] == status and body["title"] and "Traceback" not in str(body)
    assert (await api.admin_release(release["release_id"]))["remaining"] == 3


@pytest.mark.parametrize(
    "change",
    [
        {"closes_at": "2020-01-01T00:00:00+08:00"},
        {"slots": [{"slot_id": "a", "starts_at": "2026-12-08T09:00:00+08:00",
                    "ends_at": "2026-12-08T10:00:00+08:00", "capacity": -5}]},
        {"waves": [{"opens_at": "OPENS", "share": 0.5}, {"opens_at": "LATER", "share": 0.4}]},
        {"opens_at": "tomorrow"},
        {"dose": "one"},
        {"slots": []},
        {"eligibility": {"min_age": 50, "max_age": 9}},
        {"unexpected": True},
        {"release_id": "bad{id}"},
        {"mode": "auction"},
    ],
)
async def test_bad_release_definitions_create_nothing(api, redis, change):
    definition = release_definition([5])
    for wave in change.get("waves", []):
        wave["opens_at"] = definition["opens_at"] if wave["opens_at"] == "OPENS" else \
            _shift(definition["opens_at"], 60)
    definition.update(change)
    status, _, body = await api.call("POST", "/v1/admin/releases", json=definition,
                                     headers=api.admin_headers)
    assert status == 422 and body["code"] == "invalid" and body["detail"]
    assert not await redis.exists(keys.meta_key(definition["release_id"]))
    status, _, _ = await api.call("GET", f"/v1/admin/releases/{definition['release_id']}",
                                  headers=api.admin_headers)
    assert status == 404


async def test_admin_api_needs_the_admin_token(api, stack_settings):
    resident, = residents(stack_settings, 1)
    status, _, body = await api.call("POST", "/v1/admin/releases", json=release_definition([1]),
                                     headers=resident.headers)
    assert (status, body["code"]) == (401, "unauthorized")


async def test_public_release_pages(api, stack_settings):
    release = await api.create_release(release_definition([2, 3]))
    rid = release["release_id"]
    resident, = residents(stack_settings, 1)
    assert (await api.claim(rid, resident, slot_id="s1"))[0] == 201
    deadline = time.monotonic() + 3
    while True:  # the page is served from each gateway's view, refreshed every 0.2 s
        status, _, page = await api.call("GET", f"/v1/releases/{rid}")
        if page["remaining"] == 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and page["status"] == "open" and page["mode"] == "first_come"
    assert [s["remaining"] for s in page["slots"]] == [2, 2]
    status, _, listing = await api.call("GET", "/v1/releases")
    assert status == 200 and rid in {r["release_id"] for r in listing}
    assert (await api.call("GET", "/v1/releases/none"))[0] == 404


@pytest.mark.parametrize("mode", ["queue", "lottery"])
async def test_release_mode_is_stored_and_shown(api, redis, mode):
    release = await api.create_release(release_definition([2], opens_in=600, mode=mode))
    rid = release["release_id"]
    assert release["mode"] == (await api.admin_release(rid))["mode"] == mode
    assert await redis.hget(keys.meta_key(rid), "mode") == mode.encode()
    status, _, page = await api.call("GET", f"/v1/releases/{rid}")
    assert status == 200 and page["mode"] == mode


async def test_health_endpoints(api):
    assert (await api.call("GET", "/healthz"))[0] == 200
    status, _, body = await api.call("GET", "/readyz")
    assert status == 200 and body["checks"] == {"redis": "up", "kafka": "up"}
    async with api.session.get(api.base_url + "/metrics") as response:
        text = await response.text()
    assert "release_claims_total" in text and "release_http_request_seconds_bucket" in text


async def test_claims_survive_a_redis_restart(api, redis, stack, stack_settings):
    release = await api.create_release(release_definition([10]))
    rid = release["release_id"]
    people = residents(stack_settings, 4)
    codes = []
    for resident in people:
        status, _, body = await api.claim(rid, resident)
        assert status == 201
        codes.append(body["code"])
    stack.stop("redis")  # SHUTDOWN-like SIGTERM: Redis writes its AOF and exits
    stack.start("redis")
    fresh = Redis.from_url(stack_settings.redis_url)
    try:
        claims = await fresh.hgetall(keys.claims_key(rid))
        assert len(claims) == 4
        assert set((await fresh.hgetall(keys.codes_key(rid))).keys()) == {c.encode() for c in codes}
        assert int(await fresh.hget(keys.taken_key(rid), "s0")) == 4
        assert await fresh.xlen(keys.outbox_key(rid)) == 4
    finally:
        await fresh.aclose()
    # The gateway reconnects by itself and the person still holds the claim.
    for _ in range(50):
        status, _, body = await api.claim(rid, people[0])
        if status != 503:
            break
        await asyncio.sleep(0.1)
    assert (status, body["code"]) == (409, "already_claimed")


def _shift(moment: str, seconds: float) -> str:
    from datetime import datetime, timedelta

    return (datetime.fromisoformat(moment) + timedelta(seconds=seconds)).isoformat()



async def test_a_reservation_left_by_a_failed_attempt_does_not_refuse_the_person(
        api, redis, stack_settings):
    """An attempt that failed with Redis (reservation made, claim and unreserve failed)
    leaves a reservation for the release without a claim: once it is older than a claim
    in flight, the person's next claim removes it and wins (409 already_claimed before)."""
    release = release_definition([5])
    await api.create_release(release)
    person, = residents(stack_settings, 1)
    now_ms = int(time.time() * 1000)
    active = keys.person_active_key(person.person_id)
    day = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y%m%d")
    left = f"{release['release_id']}|{day}|{release['clinic_id']}|vaccination"
    await redis.hset(active, "failed-attempt", f"{left}|{now_ms - 60_000}")
    status, _, body = await api.claim(release["release_id"], person, key="after-failure")
    assert status == 201, body
    assert await redis.hget(active, "failed-attempt") is None
    assert await redis.hget(active, body["claim_id"]) is not None
    # A fresh one (a twin's claim in flight) is left alone: the person is refused.
    other = release_definition([5])
    await api.create_release(other)
    fresh = f"{other['release_id']}|{day}|{other['clinic_id']}|vaccination"
    await redis.hset(active, "in-flight", f"{fresh}|{now_ms}")
    status, _, body = await api.claim(other["release_id"], person)
    assert (status, body["code"]) == (409, "already_claimed")
