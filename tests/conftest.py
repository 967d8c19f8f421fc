"""Session fixtures: a real stack (Redis, Tansu, PostgreSQL) started by the same code as
`release-service stack up`, on its own free ports, and the gateway as a child process."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from processes import ServiceProcess, free_port
from support import Api

from release_service.settings import Settings, load_settings
from release_service.stack import Stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's private tmp folder: PostgreSQL runs as another user here.
    folder = Path(tempfile.mkdtemp(prefix="release-service-test-stack-"))
    running = Stack(folder)
    try:
        running.up()
        yield running
    finally:
        running.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def stack_settings(stack: Stack) -> Settings:
    return load_settings(environ={"RELEASE_SERVICE_SETTINGS_FILE": str(stack.settings_file)})


@pytest.fixture(scope="session")
def gateway_url(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[str]:
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path_factory.mktemp("gateway"), "gateway",
                             name="gateway", http_port=port)
    gateway.start()
    url = f"http://127.0.0.1:{port}"
    gateway.wait_http(url + "/healthz")
    yield url
    gateway.stop()


@pytest.fixture
async def api(gateway_url: str, stack_settings: Settings) -> AsyncIterator[Api]:
    connector = aiohttp.TCPConnector(limit=500)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Api(session, gateway_url, stack_settings.admin_token)


@pytest.fixture
async def redis(stack_settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack_settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
async def clean_state(request: pytest.FixtureRequest) -> None:
    """Every test that uses the stack starts from empty Redis and empty tables."""
    if "stack_settings" not in request.fixturenames:
        return
    settings: Settings = request.getfixturevalue("stack_settings")
    client = Redis.from_url(settings.redis_url)
    await client.flushall()
    await client.aclose()
    conn = await asyncpg.connect(settings.database_url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'")]
        await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


def settings_with(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
