"""Rate limits hold across gateway processes: claims, booking lookups (with a separate,
small budget for misses) and one-time codes, per account and per client address."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from processes import ServiceProcess, free_port, stop_all
from support import Api, Resident, release_definition, residents

from release_service.core.settings import SettingsError, load_settings
from release_service.people.rate_limits import client_address

LIMITS = {
    "rate_claims_per_account_per_minute": 5, "rate_claims_per_address_per_minute": 8,
    "rate_lookups_per_account_per_minute": 50, "rate_lookups_per_address_per_minute": 50,
    "rate_lookup_misses_per_account_per_hour": 3, "rate_lookup_misses_per_address_per_hour": 6,
    "rate_otp_per_address_per_hour": 2,
    # Every request comes from 127.0.0.1: as a proxy, which names the client.
    "rate_limit_exempt_addresses": "", "trusted_proxies": "127.0.0.1",
}
_addresses = (f"203.0.113.{i}" for i in itertools.count(1))


def test_client_address_believes_only_trusted_proxies():
    trusted = frozenset({"10.0.0.1", "10.0.0.2"})
    assert client_address("198.51.100.7", "1.2.3.4", trusted) == "198.51.100.7"
    assert client_address("10.0.0.1", "1.2.3.4", trusted) == "1.2.3.4"
    # A hop the client wrote itself comes first; the nearest untrusted hop is the client.
    assert client_address("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", trusted) == "1.2.3.4"
    assert client_address("10.0.0.1", "not-an-address", trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", None, trusted) == "10.0.0.1"


def test_limits_are_validated():
    with pytest.raises(SettingsError, match="RATE_CLAIMS_PER_ACCOUNT_PER_MINUTE"):
        load_settings(environ={}, rate_claims_per_account_per_minute=-1)
    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        load_settings(environ={}, trusted_proxies="10.0.0.1,proxy.internal")


@pytest.fixture
async def gateways(stack_settings, tmp_path) -> AsyncIterator[list[Api]]:
    """Two gateway processes on their own ports, sharing Redis."""
    started, apis = [], []
    async with aiohttp.ClientSession() as session:
        for i in range(2):
            port = free_port()
            process = ServiceProcess(stack_settings, tmp_path, "gateway", name=f"gw{i}",
                                     http_port=port, **LIMITS)
            started.append(process.start())
            process.wait_http(f"http://127.0.0.1:{port}/healthz")
            apis.append(Api(session, f"http://127.0.0.1:{port}", stack_settings.admin_token))
        try:
            yield apis
        finally:
            stop_all(started)


async def create_seen(gateways: list[Api], definition: dict) -> dict:
    """Create a release and wait until every gateway process's view has it (each
    refreshes its view on its own, a moment after another process created it)."""
    release = await gateways[0].create_release(definition)
    for api in gateways:
        for _ in range(100):
            if (await api.call("GET", f"/v1/releases/{release['release_id']}"))[0] == 200:
                break
            await asyncio.sleep(0.05)
    return release


async def claim_from(api: Api, release_id: str, who: Resident, address: str,
                     key: str | None = None):
    headers = {**who.headers, "X-Forwarded-For": address}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await api.call("POST", f"/v1/releases/{release_id}/claims",
                          json={"person_id": who.person_id}, headers=headers)


def limited(results, name: str) -> int:
    for status, headers, body in results:
        if status == 429:
            assert body["code"] == "rate_limited" and body["limit"] == name, body
            assert 1 <= int(headers["Retry-After"]) <= 60
    return sum(status == 429 for status, _, _ in results)


async def test_claims_per_account_across_processes(gateways, stack_settings):
    release = (await create_seen(gateways, release_definition([1])))["release_id"]
    first, bot = residents(stack_settings, 2)
    assert (await claim_from(gateways[0], release, first, next(_addresses)))[0] == 201
    # A bot keeps claiming the sold-out release, each time with a new Idempotency-Key (so
    # no gateway may answer from its local view) and from a new address, alternating
    # between the processes: five attempts reach the stock, seven are refused.
    results = await asyncio.gather(*(
        claim_from(gateways[i % 2], release, bot, next(_addresses), key=f"k{i}")
        for i in range(12)))
    assert limited(results, "claims per account") == 7
    assert Counter(s for s, _, _ in results if s != 429) == {409: 5}
    # Still refused, by either process, whether or not it has seen the refusal itself.
    for api in gateways:
        status, _, body = await claim_from(api, release, bot, next(_addresses), key="again")
        assert status == 429 and body["limit"] == "claims per account"
    # Claims are counted per release: the same account claims elsewhere.
    other = (await create_seen(gateways, release_definition([1])))["release_id"]
    assert (await claim_from(gateways[1], other, bot, next(_addresses)))[0] == 201


async def test_claims_per_address_across_processes(gateways, stack_settings):
    release = (await create_seen(gateways, release_definition([100])))["release_id"]
    crowd = residents(stack_settings, 12)
    address = next(_addresses)
    results = await asyncio.gather(*(
        claim_from(gateways[i % 2], release, who, address) for i, who in enumerate(crowd)))
    assert limited(results, "claims per address") == 4
    assert sum(s == 201 for s, _, _ in results) == 8
    # The refused kept no hold on anything (their per-person reservation was given back):
    # from another address each of them wins.
    refused = [who for who, (s, _, _) in zip(crowd, results, strict=True) if s == 429]
    again = await asyncio.gather(*(claim_from(gateways[i % 2], release, who, next(_addresses))
                                   for i, who in enumerate(refused)))
    assert [s for s, _, _ in again] == [201] * 4
    assert (await gateways[1].admin_release(release))["claimed"] == 12


async def test_lookup_misses_spend_a_small_budget_that_blocks_every_lookup(
    gateways, stack_settings
):
    release = await create_seen(gateways, release_definition([10]))
    me = residents(stack_settings, 1)[0]
    status, _, mine = await claim_from(gateways[0], release["release_id"], me, next(_addresses))
    assert status == 201
    rng = random.Random(5)

    async def look(api: Api, code: str, address: str):
        return await api.call("GET", f"/v1/bookings/{code}",
                              headers={**me.headers, "X-Forwarded-For": address})

    assert (await look(gateways[1], mine["code"], next(_addresses)))[0] == 200
    guesses = [f"{rng.randrange(10**8):08d}" for _ in range(3)]
    for i, guess in enumerate(guesses):  # three misses, from three addresses
        assert (await look(gateways[i % 2], guess, next(_addresses)))[0] == 404
    # The account's miss budget is spent: the next guess, and even its own code, wait.
    status, headers, body = await look(gateways[0], "12345678", next(_addresses))
    assert status == 429 and body["limit"] == "lookup_misses per account"
    assert (await look(gateways[1], mine["code"], next(_addresses)))[0] == 429
    assert 0 < int(headers["Retry-After"]) <= 3600


async def test_one_time_codes_per_address(gateways):
    address = next(_addresses)
    answers = []
    for i in range(3):
        phone = f"139{random.randrange(10**8):08d}"
        answers.append(await gateways[i % 2].call("POST", "/v1/otp", json={"phone": phone},
                                                  headers={"X-Forwarded-For": address}))
    assert [status for status, _, _ in answers] == [202, 202, 429]
    status, _, _ = await gateways[0].call(
        "POST", "/v1/otp", json={"phone": f"139{random.randrange(10**8):08d}"},
        headers={"X-Forwarded-For": next(_addresses)})
    assert status == 202
