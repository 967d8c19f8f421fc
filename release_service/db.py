"""PostgreSQL: the connection pool and versioned migrations."""

from __future__ import annotations

import argparse
import asyncio
import re
from importlib import resources

import asyncpg
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from .settings import Settings, load_settings

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant: serialises migrators across processes.
_MIGRATION_LOCK = 7_345_112


@retry(retry=retry_if_exception_type((OSError, asyncpg.CannotConnectNowError)),
       wait=wait_exponential(multiplier=0.1, max=2), stop=stop_after_delay(30), reraise=True)
async def connect_pool(
    settings: Settings, *, min_size: int = 1, max_size: int | None = None
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=min_size,
        max_size=max_size or settings.database_pool_size, command_timeout=30,
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every packaged migration, in order."""
    found = []
    for entry in resources.files("release_service").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(database_url: str) -> list[str]:
    """Apply each migration not yet recorded, once, each in its own transaction."""
    conn = await asyncpg.connect(database_url)
    applied: list[str] = []
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())""")
        for version, name, sql in migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                done = await conn.fetchval(
                    "SELECT 1 FROM schema_migrations WHERE version = $1", version)
                if done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version, name)
                applied.append(f"{version:04d}_{name}")
    finally:
        await conn.close()
    return applied


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = load_settings()
    applied = asyncio.run(migrate(settings.database_url))
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0
