"""The gateway, relay and scripts unchanged on a local Redis Cluster of three masters with
one replica each: writes acknowledged once the shard's replica has them (k = 1), and a
shard whose master is lost fails over while claims go on."""

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
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.crc import key_slot
from support import Api, release_definition, residents

from release_service.devtools.stack import redis_binary

MASTERS = 3
NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica takes over


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="release-cluster-"))
    cluster = Cluster(folder, distinct_free_ports(2 * MASTERS))
    try:
        for port in cluster.ports:
            (folder / str(port)).mkdir()
            cluster.start(port)
        for port in cluster.ports:
            _wait_ping(port, folder / str(port) / "redis.log")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in cluster.ports], "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        cluster.wait_healthy()
        yield cluster
    finally:
        for server in cluster.servers.values():
            server.terminate()
            server.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)


class Cluster:
    """The nodes' processes, by port."""

    def __init__(self, folder: Path, ports: list[int]) -> None:
        self.folder, self.ports = folder, ports
        self.servers: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int) -> None:
        data = self.folder / str(port)
        log = (data / "redis.log").open("ab")
        self.servers[port] = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "yes",
             # A shard failing over does not stop the others (they serve their slots).
             "--cluster-require-full-coverage", "no",
             "--dir", str(data), "--save", ""], stdout=log, stderr=log)

    def lose(self, port: int) -> None:
        """The node's machine is gone: killed, its data deleted (it keeps nodes.conf,
        as a rebuilt machine given the node's identity would, to rejoin)."""
        self.servers[port].kill()
        self.servers[port].wait()
        shutil.rmtree(self.folder / str(port) / "appendonlydir", ignore_errors=True)

    def nodes(self) -> list[tuple[int, str, int]]:
        """(port, role, replicas in sync) of every live node that answers."""
        out = subprocess.run(["redis-cli", "-p", str(self.live()[0]), "cluster", "nodes"],
                             capture_output=True, check=False, text=True).stdout
        rows = []
        for line in out.splitlines():
            fields = line.split()
            port, flags = int(fields[1].split("@")[0].rsplit(":", 1)[1]), fields[2]
            if "fail" in flags or port not in self.live():
                continue
            info = subprocess.run(["redis-cli", "-p", str(port), "info", "replication"],
                                  capture_output=True, check=False, text=True).stdout
            rows.append((port, "master" if "master" in flags else "replica",
                         info.count("state=online")))
        return rows

    def live(self) -> list[int]:
        return [p for p, s in self.servers.items() if s.poll() is None]

    def wait_healthy(self) -> None:
        """State ok, and every master with its replica in sync."""
        deadline = time.monotonic() + 30
        while True:
            info = subprocess.run(["redis-cli", "-p", str(self.live()[0]), "cluster", "info"],
                                  capture_output=True, check=False).stdout
            masters = [n for n in self.nodes() if n[1] == "master"]
            if b"cluster_state:ok" in info and len(masters) == MASTERS and \
                    all(synced == 1 for _, _, synced in masters):
                return
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.2)


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
    url = f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    port = free_port()
    options = {"redis_url": url, "reconcile_grace_seconds": 3.0, "redis_min_replicas": 1}
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


async def test_a_shard_that_loses_its_master_fails_over_and_no_acknowledged_claim_is_lost(
        redis_cluster, stack_settings, tmp_path):
    """k = 1 with one replica per master: while the shard's master is lost its claims are
    answered 503 (the promoted replica has no replica of its own, so nothing can be
    confirmed on two machines), never 500; the lost node comes back empty, rejoins as the
    new master's replica, and 201s flow again. Every claim answered 201 is there."""
    url = f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="gateway",
                             http_port=port, redis_url=url, redis_min_replicas=1,
                             redis_replica_timeout_ms=100)
    gateway.start()
    try:
        gateway.wait_http(f"http://127.0.0.1:{port}/healthz")
        async with aiohttp.ClientSession() as session:
            api = Api(session, f"http://127.0.0.1:{port}", stack_settings.admin_token)
            rid = ids_on_different_shards("fo")[0]
            await api.create_release(release_definition([100], release_id=rid))
            master = _master_of(redis_cluster, rid)
            people = residents(stack_settings, 60)
            before = [await api.claim(rid, person, key="k") for person in people[:20]]
            assert {status for status, _, _ in before} == {201}
            redis_cluster.lose(master)
            answers = [await api.claim(rid, person, key="k") for person in people[20:25]]
            during = {status for status, _, _ in answers}
            assert during <= {201, 503}, during
            redis_cluster.start(master)  # empty: a full resync from the new master
            redis_cluster.wait_healthy()
            after = []
            for person in people[20:60]:  # the 503'd ones retry with their keys
                status, _, body = await api.claim(rid, person, key="k")
                after.append((status, body))
            assert {status for status, _ in after} == {201}
            won = [b for _, _, b in before] + [b for _, b in after]
            assert len({b["claim_id"] for b in won}) == 60
            view = await api.admin_release(rid)
            assert view["claimed"] == 60 and view["remaining"] == 40
    finally:
        stop_all([gateway])


def _master_of(cluster: Cluster, release_id: str) -> int:
    """The port of the master that holds the release's keys (its hash tag's slot)."""
    client = SyncRedisCluster(host="127.0.0.1", port=cluster.live()[0])
    try:
        return int(client.get_node_from_key(release_id).port)
    finally:
        client.close()
