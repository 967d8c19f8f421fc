"""A gateway stopped right after a spike ends cleanly: SIGTERM must never leave it hanging
(a cancellation absorbed inside a Redis command once kept the release-view refresher, and
so the whole shutdown, waiting forever)."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
from processes import ServiceProcess, free_port
from support import Api, release_definition, residents

ROUNDS = 4


async def test_gateway_exits_on_sigterm_right_after_a_spike(stack_settings, tmp_path):
    people = residents(stack_settings, 2000)
    for round_ in range(ROUNDS):
        port = free_port()
        gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name=f"gateway-{round_}",
                                 http_port=port)
        gateway.start()
        url = f"http://127.0.0.1:{port}"
        gateway.wait_http(url + "/healthz")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            api = Api(session, url, stack_settings.admin_token)
            release = await api.create_release(release_definition([100, 100]))
            results = await asyncio.gather(*(api.claim(release["release_id"], p)
                                             for p in people))
        assert sorted(status for status, _, _ in results).count(201) == 200
        # kill() waits for the exit and raises (after a SIGKILL) if it never comes.
        gateway.kill(signal.SIGTERM)
        assert gateway.process is not None and gateway.process.returncode == 0, gateway.log()
