"""Session fixtures: a real stack (Redis, Tansu, PostgreSQL) started by the same code as
`release-service stack up`, on its own free ports, and the gateway as a child process."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from processes import Pipeline, ServiceProcess, free_port
from support import Api

from release_service.core.settings import PREFIX, Settings, load_settings
from release_service.devtools.stack import Stack


def typed_settings(values: Mapping[str, str]) -> dict[str, object]:
    """`Stack.up()` returns strings; give each the type of its Settings field."""
    kinds = {f.name: f.type for f in dataclasses.fields(Settings)}
    convert: dict[object, Callable[[str], object]] = {
        "int": int, "float": float,
        "bool": lambda raw: raw.strip().lower() in {"1", "true", "yes", "on"},
    }
    return {name: convert.get(kinds[name], str)(raw) for name, raw in values.items()}


@pytest.fixture(scope="session")
def _stack_up(tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Stack, dict[str, str]]]:
    # Its own folder and ports: never a developer's .stack. Not under pytest's tmp folder
    # (mode 0700), which the postgres account cannot enter when we run as root.
    folder = Path(tempfile.mkdtemp(prefix="release-service-test-stack-"))
    running = Stack(folder)
    try:
        yield running, running.up()
    finally:
        running.down()
        # Keep the components' logs with pytest's other leftovers, for post-mortems.
        if running.logs.is_dir():
            shutil.copytree(running.logs, tmp_path_factory.mktemp("stack-logs"),
                            dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(_stack_up: tuple[Stack, dict[str, str]]) -> Stack:
    return _stack_up[0]


@pytest.fixture(scope="session")
def stack_settings(_stack_up: tuple[Stack, dict[str, str]]) -> Settings:
    running, values = _stack_up
    # environ names the stack's own file: with environ={} a ./.stack/settings.env in the
    # working directory would fill in whatever `values` does not set.
    return load_settings(environ={PREFIX + "SETTINGS_FILE": str(running.settings_file)},
                         **typed_settings(values))


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


@pytest.fixture
async def db(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def pipeline(stack_settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    """Relay, bookings consumer and SMS consumer running for one test."""
    running = Pipeline(stack_settings, tmp_path)
    running.start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
async def clean_state(request: pytest.FixtureRequest) -> None:
    """Every test that uses the stack starts from empty Redis, empty tables and sequences
    at their start (booking codes are derived from booking_code_seq)."""
    if "stack_settings" not in request.fixturenames:
        return
    settings: Settings = request.getfixturevalue("stack_settings")
    client = Redis.from_url(settings.redis_url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    conn = await asyncpg.connect(settings.database_url)
    try:
        tables = [r["name"] for r in await conn.fetch(
            "SELECT quote_ident(tablename) AS name FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")]
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        # RESTART IDENTITY only resets sequences owned by a column; booking_code_seq is not.
        for (sequence,) in await conn.fetch(
                "SELECT quote_ident(sequencename) FROM pg_sequences WHERE schemaname = 'public'"):
            await conn.execute(f"ALTER SEQUENCE {sequence} RESTART")
    finally:
        await conn.close()


def settings_with(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
