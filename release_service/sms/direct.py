"""SMS the gateway sends itself, through the same provider as the SMS consumer: one-time
login codes and resent booking confirmations (a resident is waiting; no queue)."""

from __future__ import annotations

import asyncpg

from ..bookings.store import Booking
from ..core.errors import NotFound, Unavailable
from ..core.settings import Settings
from .messages import SmsJob, load_contexts, render
from .providers import ProviderError, SmsProvider


class DirectSms:
    def __init__(self, pool: asyncpg.Pool, provider: SmsProvider, settings: Settings) -> None:
        self._pool = pool
        self._provider = provider
        self._zone = settings.zone

    async def resend(self, booking: Booking, attempt: int) -> None:
        job = SmsJob(booking.claim_id, "confirmation", booking.code, booking.release_id,
                     booking.slot_id, booking.account_id)
        context = (await load_contexts(self._pool, [job])).get(job.claim_id)
        if context is None:
            raise NotFound("the booking is not persisted yet; try again in a moment")
        await self._send(f"{job.message_id}:resend:{attempt}", context.phone,
                         render(job, context, self._zone))

    async def send_otp(self, message_id: str, phone: str, code: str) -> None:
        await self._send(message_id, phone,
                         f"【疫苗预约】验证码 {code}，5分钟内有效。请勿告诉他人。")

    async def _send(self, message_id: str, phone: str, text: str) -> None:
        try:
            await self._provider.send(message_id, phone, text)
        except ProviderError as exc:
            raise Unavailable("the SMS provider is unavailable; try again", retry_after=5) \
                from exc
