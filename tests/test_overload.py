"""Overload: past the in-flight limit the gateway answers 503 at once, and nothing is
half-done: every 201 is a claim, every claim a 201."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from processes import ServiceProcess, free_port
from support import Api, release_definition, residents


async def test_past_the_in_flight_limit_answers_503_and_no_claim_is_half_done(
    stack_settings, tmp_path, redis
):
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="small-gateway",
                             http_port=port, max_in_flight=8).start()
    url = f"http://127.0.0.1:{port}"
    try:
        gateway.wait_http(url + "/healthz")
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000)) as session:
            api = Api(session, url, stack_settings.admin_token)
            release = await api.create_release(release_definition([300]))
            people = residents(stack_settings, 1500)
            results = await asyncio.gather(*(api.claim(release["release_id"], p)
                                             for p in people))
            statuses = Counter(status for status, _, _ in results)
            assert set(statuses) <= {201, 409, 503}, statuses
            assert statuses[503] > 0
            shed = [(h, b) for s, h, b in results if s == 503]
            assert all(h["Retry-After"] == "1" and b["code"] == "overloaded" for h, b in shed)
            view = await api.admin_release(release["release_id"])
            assert view["claimed"] == statuses[201]
            # Load gone: full service again.
            late, = residents(stack_settings, 1)
            assert (await api.claim(release["release_id"], late))[0] in (201, 409)
            status, _, _ = await api.call("GET", "/healthz")
            assert status == 200
    finally:
        gateway.stop()
