"""SMS consumer: one confirmation (or cancellation) SMS per booking, exactly once.

`decode` and `render` are pure. `SmsProcessor.handle` writes the message row before
sending (UNIQUE claim_id+kind: a replayed event finds it) and marks it after; provider
errors are retried with exponential backoff and full jitter under a provider rate limit;
a message that still fails is marked `failed` and dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from aiokafka import ConsumerRecord
from aiolimiter import AsyncLimiter
from prometheus_client import Counter
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from consumers.runner import (
    ConsumerRunner,
    DeadLetter,
    InvalidMessage,
    json_object,
    main_until_signalled,
    request_id_of,
    run_until,
)
from consumers.sms_providers import ProviderError, SmsProvider, provider_from_settings
from release_service import topics as kafka_topics
from release_service.db import connect_pool
from release_service.resident_id import mask_phone
from release_service.settings import Settings

log = logging.getLogger("consumers.sms")

SMS_SENT = Counter("release_sms_sent_total", "SMS accepted by the provider", ["kind"])
SMS_FAILED = Counter("release_sms_failed_total", "SMS given up on (dead-lettered)", ["kind"])
SMS_RETRIED = Counter("release_sms_retried_total", "SMS send attempts that were retried")

CONCURRENCY = 64
WEEKDAYS = "一二三四五六日"
KIND_BY_TOPIC = {kafka_topics.CLAIMS: "confirmation", kafka_topics.CANCELLATIONS: "cancellation"}


@dataclass(frozen=True, slots=True)
class SmsJob:
    claim_id: str
    kind: str
    code: str
    release_id: str
    slot_id: str
    account_id: str
    request_id: str = ""

    @property
    def message_id(self) -> str:
        return f"{self.claim_id}:{self.kind}"


@dataclass(frozen=True, slots=True)
class SmsContext:
    phone: str
    vaccine: str
    dose: int
    clinic_id: str
    department: str
    starts_at: datetime


def decode(record: ConsumerRecord[bytes, bytes]) -> SmsJob:
    data = json_object(record)
    values = {}
    for name in ("claim_id", "code", "release_id", "slot_id", "account_id"):
        value = data.get(name)
        if not isinstance(value, str) or not value or len(value) > 128:
            raise InvalidMessage(f"{name} must be a non-empty string")
        values[name] = value
    if not (len(values["code"]) == 8 and values["code"].isdigit()):
        raise InvalidMessage("code must be 8 digits")
    kind = KIND_BY_TOPIC.get(record.topic)
    if kind is None:
        raise InvalidMessage(f"no SMS for topic {record.topic}")
    return SmsJob(kind=kind, request_id=request_id_of(record), **values)


def render(job: SmsJob, context: SmsContext, zone: Any) -> str:
    """The message text. Never the ID number or the person's name."""
    at = context.starts_at.astimezone(zone)
    when = f"{at.month}月{at.day}日 {at:%H:%M}（周{WEEKDAYS[at.weekday()]}）"
    place = f"{context.clinic_id}{context.department}"
    if job.kind == "cancellation":
        return (f"【疫苗预约】您在{place}{when}的{context.vaccine}第{context.dose}剂预约"
                f"（预约码 {job.code}）已取消，名额已释放。")
    return (f"【疫苗预约】您已成功预约{context.vaccine}第{context.dose}剂：{place}，{when}，"
            f"预约码 {job.code}。请按时携带身份证件到场接种；如需取消，请在截止时间前操作。")


_CONTEXT = """
SELECT c.claim_id, a.phone, r.vaccine, r.dose, r.clinic_id, r.department, s.starts_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     AS c(claim_id, account_id, release_id, slot_id)
LEFT JOIN accounts a ON a.account_id = c.account_id
LEFT JOIN releases r ON r.release_id = c.release_id
LEFT JOIN slots s ON s.release_id = c.release_id AND s.slot_id = c.slot_id
"""

# Returns the row's status whether it was just written or existed already.
_RESERVE = """
INSERT INTO sms_messages (claim_id, kind, phone, body) VALUES ($1, $2, $3, $4)
ON CONFLICT (claim_id, kind) DO UPDATE SET claim_id = EXCLUDED.claim_id
RETURNING status
"""


async def load_contexts(pool: asyncpg.Pool, jobs: Sequence[SmsJob]) -> dict[str, SmsContext]:
    """Phone, release and slot of each job's booking, in one query; absent when unknown."""
    rows = await pool.fetch(
        _CONTEXT, [j.claim_id for j in jobs], [j.account_id for j in jobs],
        [j.release_id for j in jobs], [j.slot_id for j in jobs])
    return {
        r["claim_id"]: SmsContext(r["phone"], r["vaccine"], r["dose"], r["clinic_id"],
                                  r["department"], r["starts_at"])
        for r in rows if r["phone"] is not None and r["vaccine"] is not None
        and r["starts_at"] is not None
    }


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retriable


class SmsProcessor:
    group_id: str = "sms"
    topics: tuple[str, ...] = (kafka_topics.CLAIMS, kafka_topics.CANCELLATIONS)
    dead_letter_topic: str = kafka_topics.SMS_DEAD_LETTER

    decode = staticmethod(decode)

    def __init__(self, pool: asyncpg.Pool, provider: SmsProvider, settings: Settings,
                 backoff_seconds: float = 0.05) -> None:
        self._pool = pool
        self._provider = provider
        self._zone = settings.zone
        self._max_attempts = settings.sms_max_attempts
        self._limiter = AsyncLimiter(settings.sms_rate_per_second, 1)
        self._backoff = backoff_seconds
        self._slots = asyncio.Semaphore(CONCURRENCY)

    async def handle(self, jobs: Sequence[SmsJob]) -> Sequence[DeadLetter]:
        contexts = await self._contexts(jobs)
        # One message per booking and kind, even when the batch repeats an event.
        first: dict[str, int] = {}
        for index, job in enumerate(jobs):
            first.setdefault(job.message_id, index)
        results = await asyncio.gather(*(
            self._deliver(jobs[i], contexts.get(jobs[i].claim_id)) for i in first.values()
        ))
        return [DeadLetter(i, reason) for i, reason in zip(first.values(), results, strict=True)
                if reason is not None]

    async def _contexts(self, jobs: Sequence[SmsJob]) -> dict[str, SmsContext]:
        return await load_contexts(self._pool, jobs)

    async def _deliver(self, job: SmsJob, context: SmsContext | None) -> str | None:
        """None when sent (now or before); otherwise why it was given up."""
        async with self._slots:
            if context is None:
                reason = "no account phone, release or slot for this booking"
                recorded = await self._pool.fetchval(
                    "INSERT INTO sms_messages (claim_id, kind, phone, body, status, last_error) "
                    "VALUES ($1, $2, '', '', 'failed', $3) ON CONFLICT DO NOTHING "
                    "RETURNING claim_id", job.claim_id, job.kind, reason)
                if recorded is None:
                    return None  # given up on (or sent) before: dead-lettered then
                SMS_FAILED.labels(job.kind).inc()
                return reason
            text = render(job, context, self._zone)
            status = await self._pool.fetchval(_RESERVE, job.claim_id, job.kind,
                                               context.phone, text)
            if status != "pending":
                return None  # sent already, or given up on earlier (dead-lettered then)
            attempts = 0
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_retriable),
                    stop=stop_after_attempt(self._max_attempts),
                    wait=wait_random_exponential(multiplier=self._backoff, max=5),
                    reraise=True,
                ):
                    with attempt:
                        attempts += 1
                        if attempts > 1:
                            SMS_RETRIED.inc()
                        async with self._limiter:
                            await self._provider.send(job.message_id, context.phone, text)
            except ProviderError as exc:
                await self._pool.execute(
                    "UPDATE sms_messages SET status = 'failed', attempts = attempts + $3, "
                    "last_error = $4 WHERE claim_id = $1 AND kind = $2",
                    job.claim_id, job.kind, attempts, str(exc))
                SMS_FAILED.labels(job.kind).inc()
                log.warning("SMS %s to %s failed after %d attempts: %s", job.message_id,
                            mask_phone(context.phone), attempts, exc,
                            extra={"request_id": job.request_id})
                return f"provider failed after {attempts} attempts: {exc}"
            await self._pool.execute(
                "UPDATE sms_messages SET status = 'sent', attempts = attempts + $3, "
                "sent_at = now() WHERE claim_id = $1 AND kind = $2",
                job.claim_id, job.kind, attempts)
            SMS_SENT.labels(job.kind).inc()
            log.info("SMS %s sent to %s", job.message_id, mask_phone(context.phone),
                     extra={"request_id": job.request_id})
            return None


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    pool = await connect_pool(settings)
    try:
        async with aiohttp.ClientSession() as session:
            processor = SmsProcessor(pool, provider_from_settings(settings, session), settings)
            runner: ConsumerRunner[SmsJob] = ConsumerRunner(settings, processor)
            await run_until(runner, stopping)
    finally:
        await pool.close()


def main(settings: Settings) -> None:
    main_until_signalled(serve, settings)
