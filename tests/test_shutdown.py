"""A gateway stopped right after a spike ends cleanly: SIGTERM must never leave it hanging
(a cancellation absorbed inside a Redis command once kept the release-view refresher, and
so the whole shutdown, waiting forever)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
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


# A process whose work ignores the stop request: first cancelled, then (when it swallows
# the cancellation, as a redis-py command can) ended by the watchdog.
STUBBORN = """
import asyncio, sys
from release_service.core.aio import run_until_signalled

async def serve(stopping):
    print("serving", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", flush=True)
            if sys.argv[1] == "cancellable":
                raise

run_until_signalled(serve, grace_seconds=0.3)
"""


@pytest.mark.parametrize(("kind", "status"), [("cancellable", 0), ("swallows", 1)])
def test_a_stop_request_ends_a_process_whose_work_ignores_it(kind, status):
    process = subprocess.Popen([sys.executable, "-c", STUBBORN, kind],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"serving\n"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, err.decode()
    assert out == b"cancelled\n"
    assert b"still running 0.3 s after the stop request; cancelling" in err
    assert b", in serve" in err  # the stuck task's stack, for the operator
    if kind == "swallows":  # faulthandler's dump of every thread, then exit
        assert b"Timeout (0:00:00" in err and b"Thread 0x" in err
    assert time.monotonic() - started < 15  # bounded by the grace, never by the test's wait
