"""Typed application keys: the resources `create_app` wires and handlers use."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from ..accounts import OneTimeCodes
from ..bookings import BookingStore
from ..cancel_script import CancelScript
from ..catalog import ReleaseCatalog
from ..claim_script import ClaimOutcome, ClaimRequest
from ..direct_sms import DirectSms
from ..lottery import Lottery
from ..person_script import PersonScript, Reservation, ReserveOutcome
from ..rate_limits import RateLimits
from ..redis_client import AnyRedis
from ..settings import Settings
from ..standby import StandbyList
from ..tick_batcher import TickBatcher
from ..tokens import TokenCodec
from ..waiting_room import AdmissionTokens, WaitingRoom
from .probes import KafkaProbe

SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenCodec)
REDIS: web.AppKey[AnyRedis] = web.AppKey("redis")
DATABASE = web.AppKey("database", asyncpg.Pool)
CATALOG = web.AppKey("catalog", ReleaseCatalog)
CLAIMS: web.AppKey[TickBatcher[ClaimRequest, ClaimOutcome]] = web.AppKey("claims")
RESERVATIONS: web.AppKey[TickBatcher[Reservation, ReserveOutcome]] = web.AppKey("reservations")
RELEASES: web.AppKey[TickBatcher[tuple[str, str], None]] = web.AppKey("releases")
PERSONS_SCRIPT = web.AppKey("persons_script", PersonScript)
CANCELS = web.AppKey("cancels", CancelScript)
BOOKINGS = web.AppKey("bookings", BookingStore)
SMS = web.AppKey("sms", DirectSms)
OTP = web.AppKey("otp", OneTimeCodes)
KAFKA_PROBE = web.AppKey("kafka_probe", KafkaProbe)
RATE_LIMITS = web.AppKey("rate_limits", RateLimits)
STANDBY = web.AppKey("standby", StandbyList)
LOTTERY = web.AppKey("lottery", Lottery)
WAITING_ROOM = web.AppKey("waiting_room", WaitingRoom)
ADMISSION_TOKENS = web.AppKey("admission_tokens", AdmissionTokens)
