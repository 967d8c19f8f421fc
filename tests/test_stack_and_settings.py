"""The local stack (the same code as `release-service stack up`) and settings parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from release_service import topics
from release_service.db import migrate, migrations
from release_service.settings import SettingsError, load_settings, write_settings_file


def test_up_is_idempotent(stack):
    before = {name: stack.pid(name) for name in ("redis", "kafka", "postgres")}
    stack.up()
    assert {name: stack.pid(name) for name in before} == before
    assert all(row.healthy for row in stack.status())


async def test_redis_has_aof_and_kafka_has_topics(stack_settings):
    redis = Redis.from_url(stack_settings.redis_url)
    try:
        assert (await redis.config_get("appendonly"))["appendonly"] == "yes"
        assert (await redis.config_get("appendfsync"))["appendfsync"] == "everysec"
    finally:
        await redis.aclose()
    admin = AIOKafkaAdminClient(bootstrap_servers=stack_settings.kafka_bootstrap)
    await admin.start()
    try:
        assert set(topics.ALL) <= set(await admin.list_topics())
    finally:
        await admin.close()


async def test_migrations_apply_once(stack_settings):
    assert await migrate(stack_settings.database_url) == []
    conn = await asyncpg.connect(stack_settings.database_url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == [v for v, _, _ in migrations()]
    assert sync == "on"


def test_a_stopped_component_comes_back_on_its_port(stack, stack_settings):
    port = stack_settings.redis_url.rsplit(":", 1)[1]
    stack.stop("redis")
    assert not next(r for r in stack.status() if r.name == "redis").healthy
    stack.up()
    assert stack_settings.redis_url.rsplit(":", 1)[1] == port
    assert next(r for r in stack.status() if r.name == "redis").healthy


def test_cli_status_and_missing_settings_are_clear(stack, tmp_path):
    cli = str(Path(sys.executable).parent / "release-service")
    status = subprocess.run([cli, "stack", "status", "--dir", str(stack.root)],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 0 and "redis" in status.stdout and "up" in status.stdout
    bad = subprocess.run([cli, "migrate"], capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "RELEASE_SERVICE_HTTP_PORT": "http"},
                         cwd=tmp_path)
    assert bad.returncode == 2 and "RELEASE_SERVICE_HTTP_PORT" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "settings.env"
    write_settings_file(path, {"http_port": 9000, "admin_token": "from-file"})
    settings = load_settings({"RELEASE_SERVICE_SETTINGS_FILE": str(path),
                              "RELEASE_SERVICE_HTTP_PORT": "9100"})
    assert settings.http_port == 9100 and settings.admin_token == "from-file"
    assert "from-file" not in repr(settings)
    assert "admin_token" not in settings.public_dict()


@pytest.mark.parametrize(("name", "value"), [
    ("HTTP_PORT", "99999"), ("REDIS_URL", "http://x"), ("KAFKA_BOOTSTRAP", "nohost"),
    ("TIMEZONE", "Mars/Olympus"), ("KAFKA_ENABLE_IDEMPOTENCE", "maybe"), ("NOPE", "1"),
    ("SMS_PROVIDER", "carrier-pigeon"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=f"RELEASE_SERVICE_{name}"):
        load_settings({f"RELEASE_SERVICE_{name}": value})
