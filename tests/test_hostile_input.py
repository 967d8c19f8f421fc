"""Hostile requests against the real gateway: forged tokens, oversized bodies and headers,
injection in every string field, slow clients. Each gets a 4xx (never a 5xx) and changes
nothing: stock, claims, the outbox and the tables stay as they were."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import date
from typing import Any

import aiohttp
import jwt
import pytest
from processes import ServiceProcess, free_port
from support import Api, Resident, at, release_definition, residents

from release_service.core import keys
from release_service.people.resident_id import generate_resident_id

INJECTIONS = [
    "'; DROP TABLE bookings; --", "\" OR 1=1 --", "]] redis.call('FLUSHALL') --[[",
    "x\x1fy\x1fz", "line\r\nX-Injected: 1", "nul\x00byte", "../../etc/passwd",
    "{\"$gt\": \"\"}", "%00%0d%0a", "😀" * 40, "p" * 5000, "\u202eevil",
]


async def snapshot(redis: Any, db: Any, release_id: str) -> tuple[Any, ...]:
    return (await redis.hgetall(keys.taken_key(release_id)),
            await redis.hget(keys.meta_key(release_id), "left"),
            await redis.xlen(keys.outbox_key(release_id)),
            await redis.hlen(keys.claims_key(release_id)),
            await db.fetchval("SELECT count(*) FROM bookings"),
            await db.fetchval("SELECT count(*) FROM releases"),
            await db.fetchval("SELECT count(*) FROM persons"),
            await db.fetchval("SELECT count(*) FROM accounts"),
            sorted(await redis.keys("person:*")))  # reservations and bans


@pytest.fixture
async def db(stack_settings):
    import asyncpg
    pool = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


def forged_tokens(settings, person: Resident) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": person.account_id, "p": [[person.person_id, 19950101, "F"]],
              "iat": now, "exp": now + 600, "aud": "release-service", "iss": "release-service"}
    secret = settings.token_secret
    header, payload, signature = person.token.split(".")
    return {
        "tampered": f"{header}.{payload[:-3]}AAA.{signature}",
        "bad signature": f"{header}.{payload}.{signature[::-1]}",
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, secret),
        "wrong audience": jwt.encode({**claims, "aud": "another-service"}, secret),
        "wrong issuer": jwt.encode({**claims, "iss": "someone-else"}, secret),
        "unsigned": jwt.encode(claims, None, algorithm="none"),
        "other secret": jwt.encode(claims, "x" * 40),
        "not a token": "hello",
    }


async def test_forged_tokens_are_refused_and_change_nothing(api, redis, db, stack_settings):
    release = await api.create_release(release_definition([3]))
    person = residents(stack_settings, 1)[0]
    before = await snapshot(redis, db, release["release_id"])
    for kind, token in forged_tokens(stack_settings, person).items():
        forged = Resident(person.account_id, person.person_id, token)
        for answer in (await api.claim(release["release_id"], forged),
                       await api.call("GET", "/v1/bookings", headers=forged.headers),
                       await api.call("GET", f"/v1/admin/releases/{release['release_id']}",
                                      headers=forged.headers)):
            status, _, body = answer
            assert status == 401 and body["code"] == "unauthorized", (kind, answer)
            assert token not in body["detail"]
    assert await snapshot(redis, db, release["release_id"]) == before


async def test_a_signed_token_of_an_account_that_is_gone_is_refused(api, db, stack_settings):
    """Tokens outlive accounts (an operator may delete one): adding a person to an account
    without a row answers 401, not the database's foreign-key error as a 500."""
    person = residents(stack_settings, 1)[0]  # signed, but no account row
    id_number = generate_resident_id(random.Random(7), date(1990, 5, 5), "F")
    status, _, body = await api.call("POST", "/v1/persons", headers=person.headers,
                                     json={"real_name": "Li Hua", "id_number": id_number})
    assert (status, body["code"]) == (401, "unauthorized")
    assert await db.fetchval("SELECT count(*) FROM persons") == 0


async def test_injection_in_every_string_field_changes_nothing(api, redis, db, stack_settings):
    release = await api.create_release(release_definition([3]))
    rid = release["release_id"]
    person = residents(stack_settings, 1)[0]
    before = await snapshot(redis, db, rid)
    for text in INJECTIONS:
        answers = [
            await api.claim(rid, person, person_id=text),
            await api.call("POST", f"/v1/releases/{rid}/claims", headers=person.headers,
                           json={"person_id": person.person_id, "slot_id": text}),
            await api.call("GET", f"/v1/bookings/{text}", headers=person.headers),
            await api.call("POST", f"/v1/bookings/{text}/cancel", headers=person.headers),
            await api.call("POST", "/v1/otp", json={"phone": text}),
            await api.call("POST", "/v1/sessions", json={"phone": "13812345678", "code": text}),
            await api.call("GET", f"/v1/releases/{text}"),
            await api.call("POST", f"/v1/releases/{text}/claims", headers=person.headers,
                           json={"person_id": person.person_id}),
            await api.call("DELETE", f"/v1/persons/{text}", headers=person.headers),
            await api.call("POST", "/v1/persons", headers=person.headers,
                           json={"real_name": "Li Hua", "id_number": text}),
            await api.call("POST", "/v1/sessions", json={
                "phone": "13812345678", "code": "123456", "real_name": text,
                "id_number": text}),
            await api.call("POST", f"/v1/admin/releases/{text}/pause",
                           headers=api.admin_headers),
            await api.call("POST", f"/v1/admin/bookings/{text}/check-in",
                           headers=api.admin_headers),
            *[await api.call("POST", "/v1/admin/releases", headers=api.admin_headers,
                             json=release_definition([1], **{field: text}))
              for field in ("release_id", "clinic_id")],
            await api.call("POST", "/v1/admin/releases", headers=api.admin_headers,
                           json=release_definition([1], slots=[{
                               "slot_id": text, "starts_at": at(3600), "ends_at": at(7200),
                               "capacity": 1}])),
        ]
        if text.isprintable() and len(text) <= 128:  # header values must be printable
            answers.append(await api.claim(rid, person, key=text, person_id="p_nobody"))
        for index, (status, _, body) in enumerate(answers):
            assert 400 <= status < 500, (text, index, status, body)
            assert body is None or "Traceback" not in str(body)
    assert await snapshot(redis, db, rid) == before
    # The release still sells normally afterwards (another account: this one has spent
    # its claims budget on the attempts above).
    assert (await api.claim(rid, residents(stack_settings, 1)[0]))[0] == 201


async def test_oversized_bodies_and_headers_are_refused(api, stack_settings):
    release = await api.create_release(release_definition([3]))
    person = residents(stack_settings, 1)[0]
    path = f"/v1/releases/{release['release_id']}/claims"
    status, _, body = await api.call("POST", path, headers=person.headers,
                                     data=b'{"person_id": "' + b"x" * 200_000 + b'"}')
    assert (status, body["code"]) == (413, "too_large")
    # Refused by the HTTP parser, before any handler (its answer is plain text).
    for extra in ({"X-Padding": "y" * (stack_settings.max_header_bytes + 1)},
                  {f"X-H{i}": "z" for i in range(stack_settings.max_headers + 1)}):
        async with api.session.post(api.base_url + path, json={"person_id": person.person_id},
                                    headers={**person.headers, **extra}) as response:
            assert response.status in (400, 431), extra.keys()
    assert (await api.claim(release["release_id"], person))[0] == 201  # nothing was taken


async def test_slow_clients_do_not_hold_up_the_others(api: Api, gateway_url, stack_settings):
    """Slowloris: 300 connections that send a header byte every half second while 300
    residents claim; every resident is answered."""
    port = int(gateway_url.rsplit(":", 1)[1])
    release = await api.create_release(release_definition([300]))
    stop = asyncio.Event()

    async def slow_client() -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            writer.write(b"POST /v1/releases/x/claims HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while not stop.is_set():
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.5)
        except OSError:  # the gateway may drop a client that never finishes its headers
            pass
        finally:
            writer.close()

    slow = [asyncio.create_task(slow_client()) for _ in range(300)]
    await asyncio.sleep(1.0)
    try:
        people = residents(stack_settings, 300)
        answers = await asyncio.gather(*(api.claim(release["release_id"], p) for p in people))
        assert [status for status, _, _ in answers].count(201) == 300
    finally:
        stop.set()
        await asyncio.gather(*slow)


async def trickle(port: int, head: bytes, stop: asyncio.Event) -> tuple[float, bytes | None]:
    """Sends `head`, then a byte a second until the gateway answers or drops the
    connection; returns the seconds that took and what came back (b"" when dropped
    without an answer, None when `stop` came first)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    answer = asyncio.ensure_future(reader.read(200))
    try:
        while not answer.done():
            if stop.is_set():
                return time.monotonic() - started, None
            await asyncio.wait([answer], timeout=1.0)
            if not answer.done():
                writer.write(b"a")
        return time.monotonic() - started, await answer
    except ConnectionError:
        return time.monotonic() - started, b""
    finally:
        answer.cancel()
        writer.close()


async def test_slow_clients_are_dropped_and_do_not_take_the_in_flight_slots(
        stack_settings, tmp_path):
    """Slowloris (a header byte a second) is dropped after the header timeout without an
    answer; a body a byte a second gets 408 after the body timeout. Slow bodies fill
    every in-flight slot meanwhile, and the slots come back."""
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="slow-gateway",
                             http_port=port, max_in_flight=4, header_timeout_seconds=1,
                             body_timeout_seconds=1).start()
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    try:
        gateway.wait_http(url + "/healthz")
        async with aiohttp.ClientSession() as session:
            api = Api(session, url, stack_settings.admin_token)
            release = await api.create_release(release_definition([10]))
            path = f"/v1/releases/{release['release_id']}/claims"
            slow_heads = [trickle(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: "
                                  .encode(), stop) for _ in range(20)]
            slow_bodies = [trickle(port, (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {p.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode(),
                stop) for p in residents(stack_settings, 4)]
            # Bounded, so that a gateway that never drops them fails instead of hanging.
            timer = asyncio.get_running_loop().call_later(20, stop.set)
            results = await asyncio.gather(*slow_heads, *slow_bodies)
            timer.cancel()
            for seconds, answer in results[:20]:
                assert answer == b"", (seconds, answer)
            for seconds, answer in results[20:]:
                assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), seconds
                assert b"application/problem+json" in answer
            # Every in-flight slot is free again, and nothing was taken.
            assert (await api.claim(release["release_id"],
                                    residents(stack_settings, 1)[0]))[0] == 201
            assert (await api.admin_release(release["release_id"]))["claimed"] == 1
    finally:
        stop.set()
        gateway.stop()
