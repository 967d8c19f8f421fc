"""Typed application keys: the resources `create_app` wires and handlers use."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from ..catalog import ReleaseCatalog
from ..claim_batcher import ClaimBatcher
from ..redis_client import AnyRedis
from ..settings import Settings
from ..tokens import TokenCodec
from .probes import KafkaProbe

SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenCodec)
REDIS: web.AppKey[AnyRedis] = web.AppKey("redis")
DATABASE = web.AppKey("database", asyncpg.Pool)
CATALOG = web.AppKey("catalog", ReleaseCatalog)
CLAIMS = web.AppKey("claims", ClaimBatcher)
KAFKA_PROBE = web.AppKey("kafka_probe", KafkaProbe)
