"""Redis with replicas and Sentinel: the stack's topology and status, writes acknowledged
only once a replica has them, start-up checks that name the setting, and a client that
follows a failover by itself (the short forms; `loadtest/chaos.py --redis-replicas 2`
runs the spikes)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from support import release_definition

from release_service.core import keys
from release_service.core.errors import ReplicasBehind
from release_service.core.settings import Settings, SettingsError, load_settings
from release_service.devtools.stack import SENTINEL_MASTER, Stack
from release_service.gateway.middleware import engine_down
from release_service.releases.catalog import ReleaseCatalog
from release_service.releases.definition import parse_definition
from release_service.releases.store import preheat
from release_service.scripts.claim import ClaimOutcome, ClaimRequest, ClaimScript
from release_service.scripts.client import check_topology, redis_client
from release_service.scripts.replicated import ReplicatedScript

BIN = Path(sys.executable).parent / "release-service"
# Writes its argument under its key, and answers the value it wrote.
SET_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]"


@pytest.fixture(scope="module")
def ha_stack() -> Iterator[Stack]:
    """A Redis primary, two replicas and three sentinels (no broker, no database)."""
    folder = Path(tempfile.mkdtemp(prefix="release-service-ha-"))
    stack = Stack(folder, redis_replicas=2)
    try:
        stack._write_topology()
        for name in stack.sentinels + stack.redis_nodes:  # as `up` does
            stack.start(name)
        stack.wait_replicated()
        yield stack
    finally:
        for name in reversed(stack.components):
            stack.stop(name)
        shutil.rmtree(folder, ignore_errors=True)


def ha_settings(stack: Stack, **changes: object) -> Settings:
    ports = stack._ports()
    environ = {
        "RELEASE_SERVICE_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "RELEASE_SERVICE_REDIS_SENTINELS": ",".join(
            f"127.0.0.1:{ports[n]}" for n in stack.sentinels),
        "RELEASE_SERVICE_REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
        "RELEASE_SERVICE_REDIS_MIN_REPLICAS": "1",
        "RELEASE_SERVICE_SETTINGS_FILE": os.devnull,
    }
    environ.update({f"RELEASE_SERVICE_{k.upper()}": str(v) for k, v in changes.items()})
    return load_settings(environ)


def test_status_names_every_component_with_its_role(ha_stack):
    result = subprocess.run([str(BIN), "stack", "status", "--dir", str(ha_stack.root),
                             "--json"], capture_output=True, text=True, check=False)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert result.returncode == 1  # the broker and the database are not running here
    assert [rows[n]["role"] for n in ha_stack.redis_nodes] == \
        ["primary", "replica", "replica"]
    assert {rows[n]["role"] for n in ha_stack.sentinels} == {"sentinel"}
    for name in ha_stack.redis_nodes + ha_stack.sentinels:
        row = rows[name]
        assert row["healthy"] and row["pid"] == ha_stack.pid(name)
        assert row["port"] == ha_stack._ports()[name]
        assert Path(row["data_dir"]).is_dir()
    assert (rows["kafka"]["state"], rows["postgres"]["state"]) == ("down", "down")
    nodes = [ha_stack.data_dir(n) / "redis.conf" for n in ha_stack.redis_nodes]
    assert all("min-replicas-to-write 1" in c.read_text() for c in nodes)


async def test_a_write_is_answered_once_a_replica_has_it(ha_stack):
    redis = redis_client(ha_settings(ha_stack))
    try:
        script = ReplicatedScript(redis, SET_SCRIPT, min_replicas=1, timeout_ms=2000)
        assert await script(["ha:w"], ["one"]) == b"one"
        replica = Redis(port=ha_stack._ports()["redis-replica-1"])
        try:
            assert await replica.get("ha:w") == b"one"
        finally:
            await replica.aclose()
    finally:
        await redis.aclose()


async def test_a_write_more_replicas_must_confirm_than_exist_is_not_acknowledged(ha_stack):
    redis = redis_client(ha_settings(ha_stack))
    try:
        script = ReplicatedScript(redis, SET_SCRIPT, min_replicas=3, timeout_ms=100)
        with pytest.raises(ReplicasBehind) as refused:
            await script(["ha:x"], ["maybe"])
        assert refused.value.status == 503 and refused.value.retry_after == 1
        # WAIT is no rollback: the write may survive, and a retry finds out.
        assert await redis.get("ha:x") == b"maybe"
    finally:
        await redis.aclose()


async def test_a_batch_the_replicas_did_not_confirm_answers_its_refusals(ha_stack):
    """Only a win is in doubt when WAIT falls short: a refusal in the same batch is
    answered as it is (else its resident gets a 503 and keeps a reservation for a claim
    that never was)."""
    redis = redis_client(ha_settings(ha_stack))
    try:
        definition = parse_definition(release_definition([1]))
        assert definition.release_id is not None
        await preheat(redis, definition, ZoneInfo("Asia/Shanghai"), 0, 16)
        script = ClaimScript(redis, "a secret", min_replicas=3, replica_timeout_ms=100)
        won, refused = await script.each(definition.release_id, [
            ClaimRequest(claim_id=f"c{i}", account_id=f"a{i}", person_id=f"p{i}",
                         slot_id="s0", idempotency_key=f"k{i}", birth=19950101, sex="F")
            for i in range(2)])
        assert isinstance(won, ReplicasBehind) and won.status == 503
        assert isinstance(refused, ClaimOutcome) and refused.status == "sold_out"
        with pytest.raises(ReplicasBehind):  # as the standby list and the draw call it
            await script(definition.release_id, [ClaimRequest(
                claim_id="c2", account_id="a0", person_id="p0", slot_id="s0",
                idempotency_key="k0", birth=19950101, sex="F", replay_only=True)])
    finally:
        await redis.aclose()


async def test_a_primary_without_the_script_loads_it_and_runs_it_once(ha_stack):
    redis = redis_client(ha_settings(ha_stack))
    try:
        script = ReplicatedScript(redis, "return redis.call('INCR', KEYS[1])", min_replicas=1)
        await redis.script_flush()  # as a promoted replica's empty cache
        assert await script(["ha:n"], []) == 1
        assert await redis.get("ha:n") == b"1"
    finally:
        await redis.aclose()


async def test_start_up_checks_name_the_setting(ha_stack):
    await check_topology(ha_settings(ha_stack))
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER='elsewhere'"):
        await check_topology(ha_settings(ha_stack, redis_sentinel_master="elsewhere"))
    with pytest.raises(SettingsError, match="REDIS_MIN_REPLICAS=3: the primary has 2"):
        await check_topology(ha_settings(ha_stack, redis_min_replicas=3))
    with pytest.raises(SettingsError, match=r"REDIS_SENTINELS=.*no sentinel answers"):
        await check_topology(ha_settings(ha_stack, redis_sentinels="127.0.0.1:1"))


async def test_every_client_follows_a_failover_and_listeners_resubscribe(ha_stack):
    """The primary's machine is lost (killed, data gone): writes fail only with errors the
    gateway answers 503 (no primary; then NOREPLICAS from the promoted one until a replica
    follows it), then reach the promoted replica without a new client; the
    release-events listener hears the new primary; the old node comes back as a replica."""
    settings = ha_settings(ha_stack)
    redis = redis_client(settings)
    catalog = ReleaseCatalog(redis, 60.0)
    listener = asyncio.create_task(catalog.listen())
    try:
        await redis.set("ha:before", 1)
        old = ha_stack.redis_nodes[0]
        ha_stack.stop(old, signal.SIGKILL)
        shutil.rmtree(ha_stack.data_dir(old) / "appendonlydir")
        failures: list[BaseException] = []
        deadline = time.monotonic() + 30
        while True:
            try:
                await redis.set("ha:after", 1)
                break
            except RedisError as exc:  # no primary yet, or one without a replica yet
                if not engine_down(exc):
                    raise
                failures.append(exc)
                assert time.monotonic() < deadline, "no write reached a new primary"
                await asyncio.sleep(0.1)
        assert failures  # the failover was not instantaneous: every failure was a 503
        assert await redis.get("ha:before") == b"1"  # it had reached the replicas
        catalog._wake.clear()
        deadline = time.monotonic() + 15
        while not catalog._wake.is_set():
            assert time.monotonic() < deadline, "the listener never heard the new primary"
            await redis.publish(keys.RELEASE_EVENTS_CHANNEL, "ha")
            await asyncio.sleep(0.2)
        ha_stack.start(old)  # empty, and told to follow the new primary
        ha_stack.wait_replicated()
        back = Redis(port=ha_stack._ports()[old])
        try:
            deadline = time.monotonic() + 15
            while (await back.execute_command("ROLE"))[0] != b"slave" or \
                    await back.get("ha:after") != b"1":
                assert time.monotonic() < deadline, "the old primary did not rejoin"
                await asyncio.sleep(0.1)
        finally:
            await back.aclose()
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()
