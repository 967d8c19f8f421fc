"""`create_app(settings)`: wires settings, routes, middleware and one cleanup context per
resource. Nothing else happens here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..bookings.store import BookingStore
from ..claims import flow as claims
from ..core.db import connect_pool
from ..core.metrics import watch_event_loop
from ..core.settings import Settings
from ..modes.lottery import Lottery, draw_when_due
from ..modes.queue import AdmissionTokens
from ..modes.standby import StandbyList, resume_handoffs
from ..people.accounts import OneTimeCodes
from ..people.limits import BookingLimits
from ..people.rate_limits import RateLimits
from ..people.tokens import TokenCodec
from ..pipeline.worker import run_relay
from ..releases.catalog import ReleaseCatalog
from ..scripts.batcher import TickBatcher
from ..scripts.booking_codes import code_keys
from ..scripts.cancel import CancelScript
from ..scripts.claim import ClaimScript
from ..scripts.client import redis_client
from ..scripts.queue import QueueScripts
from ..scripts.reserve import ReserveScript
from ..sms.direct import DirectSms
from ..sms.providers import provider_from_settings
from . import accounts, bookings, health, lottery, openapi, ops, queue, releases, standby
from .appkeys import (
    ADMISSION_TOKENS,
    BOOKINGS,
    CANCELS,
    CATALOG,
    CLAIMS,
    DATABASE,
    KAFKA_PROBE,
    LOTTERY,
    OTP,
    RATE_LIMITS,
    REDIS,
    RESERVATIONS,
    RESERVE_SCRIPT,
    SETTINGS,
    SMS,
    STANDBY,
    TOKENS,
    UNRESERVE,
    WAITING_ROOM,
)
from .middleware import gateway_middleware
from .probes import KafkaProbe


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = redis_client(settings)
    await redis.ping()
    app[REDIS] = redis
    yield
    await redis.aclose()


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await connect_pool(app[SETTINGS])
    app[DATABASE] = pool
    yield
    await pool.close()


async def catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    platform_limits = BookingLimits(settings.limit_same_day_clinic, settings.limit_per_day,
                             settings.limit_per_7_days, settings.limit_per_3_months)
    catalog = ReleaseCatalog(app[REDIS], settings.release_view_refresh_seconds, platform_limits)
    await catalog.refresh()
    app[CATALOG] = catalog
    tasks = [asyncio.create_task(catalog.run()), asyncio.create_task(catalog.listen()),
             asyncio.create_task(watch_event_loop())]
    yield
    catalog.close()
    for task in tasks[1:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def scripts_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, redis = app[SETTINGS], app[REDIS]
    # Claims (admissions, standby hand-overs, lottery winners) and cancellations are told
    # to residents: acknowledged once on this many replicas.
    replicas = (settings.redis_min_replicas, settings.redis_replica_timeout_ms)
    claim = ClaimScript(redis, settings.code_secret, *replicas)
    claims = TickBatcher("claim", claim.each)
    persons = ReserveScript(redis, *replicas)
    reservations = TickBatcher("reserve", persons.reserve)
    app[CLAIMS], app[RESERVATIONS], app[RESERVE_SCRIPT] = claims, reservations, persons
    app[UNRESERVE] = TickBatcher("unreserve", persons.unreserve_batch)
    app[CANCELS] = CancelScript(redis, *replicas)
    app[BOOKINGS] = BookingStore(app[DATABASE], redis, code_keys(settings.code_secret))
    app[RATE_LIMITS] = RateLimits(redis, settings)
    app[WAITING_ROOM] = QueueScripts(redis)
    app[STANDBY] = StandbyList(redis, claim, persons,
                               app[CATALOG], settings.standby_decline_seconds)
    app[LOTTERY] = Lottery(redis, claim, persons,
                           app[CATALOG], settings.code_secret)
    stopping = asyncio.Event()
    background = [
        asyncio.create_task(resume_handoffs(app[STANDBY], app[CATALOG],
                                            settings.standby_resume_seconds, stopping)),
        asyncio.create_task(draw_when_due(app[LOTTERY], app[CATALOG], stopping)),
    ]
    yield
    stopping.set()  # the loops end even if a cancellation is absorbed in a Redis call
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await app[RATE_LIMITS].drain()
    # Script calls already sent have taken stock: let them finish before Redis closes.
    await reservations.drain()
    await app[UNRESERVE].drain()
    await claims.drain()


async def sms_ctx(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        provider = provider_from_settings(app[SETTINGS], session)
        app[SMS] = DirectSms(app[DATABASE], provider, app[SETTINGS])
        app[OTP] = OneTimeCodes(app[REDIS], app[SMS], app[SETTINGS].token_secret,
                                app[RATE_LIMITS])
        yield


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """With `relay_in_gateway`, this process also relays its outboxes to Kafka."""
    stopping = asyncio.Event()
    task = asyncio.create_task(run_relay(app[SETTINGS], stopping))
    yield
    stopping.set()
    await task


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[gateway_middleware(settings.max_in_flight)],
                          client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[TOKENS] = TokenCodec(settings.token_secret, settings.token_ttl_seconds)
    app[ADMISSION_TOKENS] = AdmissionTokens(settings.token_secret)
    app[KAFKA_PROBE] = KafkaProbe(settings.kafka_bootstrap)
    # Order matters: each context may use the ones before it; cleanup runs in reverse.
    app.cleanup_ctx.extend([redis_ctx, database_ctx, catalog_ctx, scripts_ctx, sms_ctx])
    if settings.relay_in_gateway:
        app.cleanup_ctx.append(relay_ctx)

    # The hot route first: aiohttp tries the routes under a path prefix in this order.
    app.router.add_post("/v1/releases/{release_id}/claims", claims.post_claim)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/openapi.json", openapi.document)
    app.router.add_get("/ops", ops.page)
    app.router.add_get("/ops/stream", ops.stream)

    app.router.add_get("/v1/releases", releases.list_releases)
    app.router.add_get("/v1/releases/{release_id}", releases.get_release)
    app.router.add_post("/v1/releases/{release_id}/queue", queue.join)
    app.router.add_get("/v1/releases/{release_id}/queue/{person_id}", queue.poll)
    app.router.add_get("/v1/releases/{release_id}/queue/{person_id}/events", queue.events)
    app.router.add_post("/v1/otp", accounts.post_otp)
    app.router.add_post("/v1/sessions", accounts.post_session)
    app.router.add_get("/v1/persons", accounts.list_persons)
    app.router.add_post("/v1/persons", accounts.add_person)
    app.router.add_delete("/v1/persons/{person_id}", accounts.delete_person)
    app.router.add_get("/v1/bookings", bookings.list_bookings)
    app.router.add_get("/v1/bookings/{code}", bookings.get_booking)
    app.router.add_post("/v1/bookings/{code}/cancel", bookings.cancel_booking)
    app.router.add_post("/v1/bookings/{code}/resend-sms", bookings.resend_sms)
    app.router.add_post("/v1/bookings/{code}/decline", bookings.decline_booking)
    app.router.add_post("/v1/releases/{release_id}/standby", standby.join_standby)
    app.router.add_get("/v1/releases/{release_id}/standby", standby.get_standby)
    app.router.add_post("/v1/releases/{release_id}/lottery/entries", lottery.enter)
    app.router.add_get("/v1/releases/{release_id}/lottery", lottery.result)
    app.router.add_post("/v1/admin/releases/{release_id}/lottery/draw", lottery.admin_draw)

    app.router.add_post("/v1/admin/releases", releases.admin_create_release)
    app.router.add_get("/v1/admin/releases/{release_id}", releases.admin_get_release)
    app.router.add_post("/v1/admin/releases/{release_id}/pause", releases.admin_pause)
    app.router.add_post("/v1/admin/releases/{release_id}/resume", releases.admin_resume)
    app.router.add_post("/v1/admin/releases/{release_id}/close", releases.admin_close)
    app.router.add_post("/v1/admin/bookings/{code}/check-in", bookings.admin_check_in)
    return app
