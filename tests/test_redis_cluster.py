"""The gateway, relay and scripts unchanged on a local 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from processes import ServiceProcess, free_port, stop_all
from redis.crc import key_slot
from support import Api, release_definition, residents

from release_service.devtools.stack import redis_binary

MASTERS = 3


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[list[int]]:
    folder = Path(tempfile.mkdtemp(prefix="release-cluster-"))
    ports = distinct_free_ports(MASTERS)
    servers = []
    try:
        for port in ports:
            data = folder / str(port)
            data.mkdir()
            log = (data / "redis.log").open("wb")
            servers.append(subprocess.Popen(
                [redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--appendonly", "yes", "--dir", str(data), "--save", ""],
                stdout=log, stderr=log))
        for port in ports:
            _wait_ping(port, folder / str(port) / "redis.log")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                capture_output=True, check=True).stdout:
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.2)
        yield ports
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)


def distinct_free_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free and valid too."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20000, 50000)
        if port in ports or not _free(port) or not _free(port + 10000):
            continue
        ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_ping(port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                         check=False).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)


def ids_on_different_shards(prefix: str) -> list[str]:
    """One release id per master: hash tags in different thirds of the slot range."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < MASTERS:
        candidate = f"{prefix}-{n}"
        chosen.setdefault(key_slot(candidate.encode()) * MASTERS // 16384, candidate)
        n += 1
    return list(chosen.values())


async def test_spike_on_redis_cluster_keeps_every_invariant(redis_cluster, stack_settings,
                                                           tmp_path):
    url = f"redis+cluster://127.0.0.1:{redis_cluster[0]}"
    port = free_port()
    options = {"redis_url": url, "reconcile_grace_seconds": 3.0}
    processes = [
        ServiceProcess(stack_settings, tmp_path, "gateway", name="gateway", http_port=port,
                       **options),
        ServiceProcess(stack_settings, tmp_path, "relay", name="relay", **options),
        ServiceProcess(stack_settings, tmp_path, "consume", "bookings", name="bookings",
                       **options),
    ]
    for process in processes:
        process.start()
    try:
        processes[0].wait_http(f"http://127.0.0.1:{port}/healthz")
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=300)) as session:
            api = Api(session, f"http://127.0.0.1:{port}", stack_settings.admin_token)
            release_ids = ids_on_different_shards("cl")
            for rid in release_ids:
                await api.create_release(release_definition([40, 20], release_id=rid,
                                                            clinic_id=f"clinic-{rid}"))
            people = residents(stack_settings, 600)
            jobs = [api.claim(rid, person) for n, rid in enumerate(release_ids)
                    for person in people[n * 200:(n + 1) * 200]]
            results = await asyncio.gather(*jobs)
            assert {status for status, _, _ in results} <= {201, 409}
            won = [body for status, _, body in results if status == 201]
            assert len(won) == 60 * MASTERS
            assert len({b["code"] for b in won}) == len(won)
            for rid in release_ids:
                view = await api.admin_release(rid)
                assert view["remaining"] == 0 and view["claimed"] == 60
                mine = [b for b in won if b["release_id"] == rid]
                assert len({b["person_id"] for b in mine}) == 60

            # Limits span shards: a person's same-day bookings in two releases on two
            # shards, with a same-day limit of 1 per clinic and 2 per day.
            a, b, c = await _three_same_day_releases(api, ids_on_different_shards("day"))
            person, = residents(stack_settings, 1)
            assert (await api.claim(a, person))[0] == 201
            assert (await api.claim(b, person))[0] == 201
            status, _, body = await api.claim(c, person)
            assert (status, body["limit"]) == (403, "per_day")

        conn = await asyncpg.connect(stack_settings.database_url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rows = await conn.fetchval(
                    "SELECT count(*) FROM bookings WHERE release_id = ANY($1::text[])",
                    release_ids)
                if rows == 60 * MASTERS:
                    break
                await asyncio.sleep(0.3)
        finally:
            await conn.close()
        assert rows == 60 * MASTERS
    finally:
        stop_all(processes)


async def _three_same_day_releases(api: Api, ids: list[str]) -> list[str]:
    base = release_definition([5])
    made = []
    for n, rid in enumerate(ids[:3]):
        definition = {**base, "release_id": rid, "clinic_id": f"day-clinic-{n}"}
        await api.create_release(definition)
        made.append(definition["release_id"])
    return made
