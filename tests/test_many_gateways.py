"""Several gateway processes on one port (SO_REUSEPORT) serve the same releases."""

from __future__ import annotations

import aiohttp
from processes import ServiceProcess, free_port
from support import Api, release_definition, residents
from test_claims import check_sold_exactly, spike


async def test_spike_across_two_gateway_processes(stack_settings, tmp_path, redis):
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="gateways",
                             http_port=port, gateway_processes=2).start()
    url = f"http://127.0.0.1:{port}"
    try:
        gateway.wait_http(url + "/healthz")
        connector = aiohttp.TCPConnector(limit=500, force_close=True)  # spread connections
        async with aiohttp.ClientSession(connector=connector) as session:
            api = Api(session, url, stack_settings.admin_token)
            release = await api.create_release(release_definition([70, 70, 60]))
            people = residents(stack_settings, 3000)
            results = await spike(api, release["release_id"], people, keyed=True)
            await check_sold_exactly(api, redis, release["release_id"], results)
            # Both processes answered: their request ids carry different process prefixes.
            prefixes = {headers["X-Request-Id"].split("-")[0]
                        for _, _, (_, headers, _) in results}
            assert len(prefixes) == 2
    finally:
        gateway.stop()
