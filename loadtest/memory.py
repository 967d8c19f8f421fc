"""Memory: the gateway's RSS with many open client connections, and Redis memory per claim
before and after the outbox is trimmed.

    python loadtest/memory.py [--connections 10000] [--claims 20000]

Starts its own stack and gateway; connections and claims go to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench import BIN, free_port, wait_http  # type: ignore[import-not-found]
from redis.asyncio import Redis
from tqdm import tqdm

from release_service.core import keys
from release_service.core.settings import load_settings, write_settings_file
from release_service.devtools.stack import Stack
from release_service.people.tokens import PersonGrant, TokenCodec


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` keep-alive connections, each having sent one request."""
    writers = []
    for _ in tqdm(range(count), desc="connections", unit="conn", file=sys.stderr):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(15)  # {"status":"ok"}
        writers.append(writer)
    return writers


async def main(args: argparse.Namespace) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="release-memory-"))
    folder.chmod(0o755)
    stack = Stack(folder / "stack")
    values = stack.up()
    settings = load_settings(environ={}, **values)
    settings_file = folder / "memory.env"
    port = free_port()
    # Idle connections are the point here: keep them past the header timeout.
    write_settings_file(settings_file, {**values, "http_port": port, "log_level": "WARNING",
                                        "reconcile_grace_seconds": 0,
                                        "header_timeout_seconds": 3600})
    env = {**os.environ, "RELEASE_SERVICE_SETTINGS_FILE": str(settings_file)}
    processes = []
    redis = Redis.from_url(settings.redis_url)
    try:
        gateway = await asyncio.create_subprocess_exec(str(BIN), "gateway", env=env)
        processes.append(gateway)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        result: dict[str, float] = {"gateway_rss_idle_mb": rss_mb(gateway.pid)}
        writers = await hold_connections(port, args.connections)
        await asyncio.sleep(1)
        result["open_connections"] = len(writers)
        result["gateway_rss_with_connections_mb"] = rss_mb(gateway.pid)
        for writer in writers:
            writer.close()

        # Redis memory per claim: claims with their outbox, then with the outbox trimmed.
        base = int((await redis.info("memory"))["used_memory"])
        codec = TokenCodec(settings.token_secret, 3600)
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            from datetime import UTC, datetime, timedelta

            now, day = datetime.now(UTC), datetime.now(UTC) + timedelta(days=9)
            rid = f"mem-{secrets.token_hex(3)}"
            async with http.post("/v1/admin/releases", headers=admin, json={
                "release_id": rid, "vaccine": "HPV9", "dose": 1, "clinic_id": "m",
                "opens_at": (now - timedelta(minutes=1)).isoformat(),
                "closes_at": (now + timedelta(hours=1)).isoformat(),
                "slots": [{"slot_id": "s", "starts_at": day.isoformat(),
                           "ends_at": (day + timedelta(hours=1)).isoformat(),
                           "capacity": args.claims}]}) as response:
                assert response.status == 201, await response.text()
            await asyncio.sleep(0.3)
            created = await redis.info("memory")
            semaphore = asyncio.Semaphore(64)

            async def claim(_: int) -> None:
                person = "p" + secrets.token_hex(6)
                token = codec.issue("a" + person, [PersonGrant(person, 19950101, "F")])
                async with semaphore, http.post(
                        f"/v1/releases/{rid}/claims", json={"person_id": person},
                        headers={"Authorization": f"Bearer {token}"}) as response:
                    assert response.status == 201
            await asyncio.gather(*(claim(i) for i in range(args.claims)))
        with_outbox = int((await redis.info("memory"))["used_memory"])
        per_claim = (with_outbox - int(created["used_memory"])) / args.claims
        result["redis_bytes_per_claim_with_outbox"] = per_claim
        # Relay and consumer persist them; reconcile (grace 0) trims the outbox.
        relay = await asyncio.create_subprocess_exec(str(BIN), "relay", env=env)
        consumer = await asyncio.create_subprocess_exec(str(BIN), "consume", "bookings", env=env)
        processes += [relay, consumer]
        deadline = time.monotonic() + 120
        while await redis.xlen(keys.outbox_key(rid)) and time.monotonic() < deadline:
            await asyncio.sleep(1)
        trimmed = int((await redis.info("memory"))["used_memory"])
        result["outbox_left"] = await redis.xlen(keys.outbox_key(rid))
        result["redis_bytes_per_claim_after_trim"] = (trimmed - int(created["used_memory"])) \
            / args.claims
        result["redis_base_bytes"] = base
        return result
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await process.wait()
        await redis.aclose()
        stack.down()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--claims", type=int, default=20_000)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = options.connections + 1024
    if soft < want:  # both ends of every connection are on this machine
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want * 2, hard), hard))
    print(json.dumps(asyncio.run(main(options)), indent=2))
