"""PostgreSQL: the connection pool and versioned migrations.

Migrations are the packaged files `release_service/core/migrations/NNNN_name.sql`, applied in
order, each once and in its own transaction (so none may use `CREATE INDEX CONCURRENTLY`),
and recorded in `schema_migrations`. A transaction-scoped advisory lock serialises
migrators, so every process may run `migrate` at start without coordinating.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from importlib import resources
from typing import NamedTuple

import asyncpg
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from .settings import Settings, load_settings

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant shared by every migrator: the key of the advisory lock.
_MIGRATION_LOCK = 7_345_112
# Refused, reset, timed out (all OSError), or a server still starting / out of slots.
_TRANSIENT = (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
CONNECT_DEADLINE_SECONDS = 30.0

_retry_connect = retry(
    retry=retry_if_exception_type(_TRANSIENT),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(CONNECT_DEADLINE_SECONDS),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


class Migration(NamedTuple):
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@_retry_connect
async def connect_pool(
    settings: Settings, *, min_size: int = 1, max_size: int | None = None
) -> asyncpg.Pool:
    """A pool on `settings.database_url`; retries while the server is unreachable."""
    size = settings.database_pool_size if max_size is None else max_size
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=min(min_size, size), max_size=size,
        command_timeout=30, timeout=5,
    )
    assert pool is not None  # create_pool only returns None when awaited lazily
    return pool


@_retry_connect
async def _connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url, timeout=5)


def migrations() -> list[Migration]:
    """Every packaged migration, in version order (read through importlib so wheels work)."""
    found: dict[int, Migration] = {}
    for entry in resources.files("release_service.core").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:  # a misnamed file would otherwise be skipped silently
            raise RuntimeError(f"migration {entry.name!r} is not named NNNN_name.sql")
        version = int(match[1])
        if version in found:
            raise RuntimeError(f"two migrations share version {version:04d}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(database_url: str) -> list[str]:
    """Apply the migrations not yet recorded; returns the labels applied (`0001_initial`)."""
    conn = await _connect(database_url)
    applied: list[str] = []
    try:
        async with conn.transaction():
            # Under the lock too: concurrent CREATE TABLE IF NOT EXISTS can still collide.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version     integer PRIMARY KEY,
                       name        text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())""")
        for migration in migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version):
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name)
                log.info("applied migration %s", migration.label)
                applied.append(migration.label)
    finally:
        await conn.close()
    return applied


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = load_settings()
    applied = asyncio.run(migrate(settings.database_url))
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0
