"""Typed application keys: the resources `create_app` wires and handlers use."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from ..bookings.store import BookingStore
from ..core.settings import Settings
from ..modes.lottery import Lottery
from ..modes.queue import AdmissionTokens
from ..modes.standby import StandbyList
from ..people.accounts import OneTimeCodes
from ..people.rate_limits import RateLimits
from ..people.tokens import TokenCodec
from ..releases.catalog import ReleaseCatalog
from ..scripts.batcher import TickBatcher
from ..scripts.cancel import CancelScript
from ..scripts.claim import ClaimOutcome, ClaimRequest
from ..scripts.client import AnyRedis
from ..scripts.queue import QueueScripts
from ..scripts.reserve import Reservation, ReserveOutcome, ReserveScript
from ..sms.direct import DirectSms
from .probes import KafkaProbe

SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenCodec)
REDIS: web.AppKey[AnyRedis] = web.AppKey("redis")
DATABASE = web.AppKey("database", asyncpg.Pool)
CATALOG = web.AppKey("catalog", ReleaseCatalog)
CLAIMS: web.AppKey[TickBatcher[ClaimRequest, ClaimOutcome]] = web.AppKey("claims")
RESERVATIONS: web.AppKey[TickBatcher[Reservation, ReserveOutcome]] = web.AppKey("reservations")
# Removes (person_id, claim_id) reservations whose claim did not win, batched per tick.
UNRESERVE: web.AppKey[TickBatcher[tuple[str, str], None]] = web.AppKey("unreserve")
RESERVE_SCRIPT = web.AppKey("reserve_script", ReserveScript)
CANCELS = web.AppKey("cancels", CancelScript)
BOOKINGS = web.AppKey("bookings", BookingStore)
SMS = web.AppKey("sms", DirectSms)
OTP = web.AppKey("otp", OneTimeCodes)
KAFKA_PROBE = web.AppKey("kafka_probe", KafkaProbe)
RATE_LIMITS = web.AppKey("rate_limits", RateLimits)
STANDBY = web.AppKey("standby", StandbyList)
LOTTERY = web.AppKey("lottery", Lottery)
WAITING_ROOM = web.AppKey("waiting_room", QueueScripts)
ADMISSION_TOKENS = web.AppKey("admission_tokens", AdmissionTokens)
