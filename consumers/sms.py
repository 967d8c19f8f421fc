"""SMS consumer: one confirmation (or cancellation) SMS per booking, exactly once.

`decode` and `render` are pure. `SmsProcessor.handle` writes each message's row before
sending (UNIQUE claim_id+kind: a replayed event finds it) and marks it after, so a row that
is `sent` or `failed` is never sent again. A row still `pending` (a crash between sending
and marking) is sent again under the same message id, which the provider honours as one
message. Provider errors are retried with exponential backoff and full jitter under a
provider rate limit; a message that still fails is marked `failed` and dead-lettered.

Failure policy: a provider that keeps failing fails the message, not the batch (dead-letter
topic, offsets move on); anything else (database down, a bug) fails the batch, which the
runner retries without committing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
    request_id_of,
    run_until,
)
from release_service.core import topics as kafka_topics
from release_service.core.aio import run_until_signalled
from release_service.core.db import connect_pool
from release_service.core.logs import mask_personal_data
from release_service.core.settings import Settings
from release_service.people.resident_id import mask_phone
from release_service.sms.messages import (
    NOTICES,
    SmsContext,
    SmsJob,
    load_contexts,
    render,
)
from release_service.sms.providers import ProviderError, SmsProvider, provider_from_settings

log = logging.getLogger("consumers.sms")

SMS_SENT = Counter("release_sms_sent_total", "SMS accepted by the provider", ["kind"])
SMS_FAILED = Counter("release_sms_failed_total", "SMS given up on (dead-lettered)", ["kind"])
SMS_RETRIED = Counter("release_sms_retried_total",
                      "SMS send attempts that failed and were retried", ["kind"])

CONCURRENCY = 64  # provider calls in flight at once
KIND_BY_TOPIC = {kafka_topics.CLAIMS: "confirmation", kafka_topics.CANCELLATIONS: "cancellation",
                 kafka_topics.LOTTERY: "lottery_lost", kafka_topics.STANDBY: "standby_skipped"}
_MAX_FIELD = 128
_MAX_ERROR = 500


def decode(record: ConsumerRecord[bytes, bytes]) -> SmsJob:
    kind = KIND_BY_TOPIC.get(record.topic)
    if kind is None:
        raise InvalidMessage(f"no SMS for topic {record.topic}")
    data = json_object(record)
    booked = kind not in NOTICES
    names = ("claim_id", "code", "release_id", "slot_id", "account_id") if booked else (
        "claim_id", "release_id", "account_id")
    values = {"code": "", "slot_id": ""}
    for name in names:
        value = data.get(name)
        if not isinstance(value, str) or not value or len(value) > _MAX_FIELD:
            raise InvalidMessage(f"{name} must be a non-empty string")
        values[name] = value
    code = values["code"]
    if booked and not (len(code) == 8 and code.isascii() and code.isdigit()):
        raise InvalidMessage("code must be 8 digits")
    decline_until_ms = 0
    if kind == "confirmation" and data.get("via") == "standby":
        until = data.get("decline_until_ms")
        if not isinstance(until, int) or isinstance(until, bool) or until <= 0:
            raise InvalidMessage("decline_until_ms must be a positive integer")
        decline_until_ms = until
    skip_reason = ""
    if kind == "standby_skipped":
        reason, detail = data.get("reason"), data.get("detail", "")
        if not isinstance(reason, str) or not isinstance(detail, str) \
                or len(reason) + len(detail) > _MAX_FIELD:
            raise InvalidMessage("reason and detail must be strings")
        skip_reason = f"{reason}:{detail}" if detail else reason
    return SmsJob(kind=kind, request_id=request_id_of(record),
                  decline_until_ms=decline_until_ms, skip_reason=skip_reason, **values)


# Rows in (claim_id, kind) order, so two consumers writing overlapping batches (during a
# rebalance) take the unique-index locks in the same order and cannot deadlock.
_RESERVE = """
INSERT INTO sms_messages (claim_id, kind, phone, body, status, last_error)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
ORDER BY 1, 2
ON CONFLICT (claim_id, kind) DO NOTHING
RETURNING claim_id, kind
"""

_EXISTING = """
SELECT m.claim_id, m.kind, m.status, m.phone, m.body
FROM sms_messages m JOIN unnest($1::text[], $2::text[]) AS k(claim_id, kind)
  ON m.claim_id = k.claim_id AND m.kind = k.kind
"""

_ATTEMPT_FAILED = """
UPDATE sms_messages SET attempts = attempts + 1, last_error = $3
WHERE claim_id = $1 AND kind = $2
"""

# `status <> 'sent'`: another consumer (a rebalance) may have marked it first.
_SENT = """
UPDATE sms_messages SET status = 'sent', attempts = attempts + 1, sent_at = now()
WHERE claim_id = $1 AND kind = $2 AND status <> 'sent'
"""

_GIVEN_UP = """
UPDATE sms_messages SET status = 'failed'
WHERE claim_id = $1 AND kind = $2 AND status = 'pending'
"""

NO_CONTEXT = "no account phone, release or slot for this booking"


@dataclass(frozen=True, slots=True)
class _Pending:
    """A message whose row says `pending`: what to send, exactly as the row holds it."""

    index: int  # in the batch handed to `handle`
    job: SmsJob
    phone: str
    body: str


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retriable


def _limiter(rate_per_second: float) -> AsyncLimiter:
    # AsyncLimiter holds `max_rate` tokens; below one a second, spread one over the period.
    if rate_per_second >= 1:
        return AsyncLimiter(rate_per_second, 1)
    return AsyncLimiter(1, 1 / rate_per_second)


class SmsProcessor:
    group_id: str = kafka_topics.SMS_GROUP
    topics: tuple[str, ...] = tuple(KIND_BY_TOPIC)
    dead_letter_topic: str = kafka_topics.SMS_DEAD_LETTER

    decode = staticmethod(decode)

    def __init__(self, pool: asyncpg.Pool, provider: SmsProvider, settings: Settings, *,
                 backoff_base: float = 0.5, backoff_max: float = 30.0,
                 concurrency: int = CONCURRENCY) -> None:
        self._pool = pool
        self._provider = provider
        self._zone = settings.zone
        self._max_attempts = settings.sms_max_attempts
        self._limiter = _limiter(settings.sms_rate_per_second)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._in_flight = asyncio.Semaphore(concurrency)

    async def handle(self, jobs: Sequence[SmsJob]) -> Sequence[DeadLetter]:
        # One message per booking and kind, even when the batch repeats an event.
        first: dict[str, int] = {}
        for index, job in enumerate(jobs):
            first.setdefault(job.message_id, index)
        unique = [jobs[i] for i in first.values()]
        contexts = await load_contexts(self._pool, unique)
        pending, dead = await self._reserve(unique, first, contexts)
        # A TaskGroup, not gather: when one delivery raises (database down), the others
        # are cancelled before `handle` raises, so the runner's retry never overlaps them.
        async with asyncio.TaskGroup() as group:
            tasks = [(p.index, group.create_task(self._deliver(p))) for p in pending]
        dead += [DeadLetter(index, reason) for index, task in tasks
                 if (reason := task.result()) is not None]
        return sorted(dead, key=lambda d: d.index)

    async def _reserve(self, jobs: Sequence[SmsJob], index_of: dict[str, int],
                       contexts: dict[str, SmsContext]
                       ) -> tuple[list[_Pending], list[DeadLetter]]:
        """Write a row for every message not seen before (`pending`, or `failed` at once
        when it cannot be addressed); return what is pending and what failed just now."""
        texts = {job.message_id: render(job, contexts[job.claim_id], self._zone)
                 for job in jobs if job.claim_id in contexts}
        no_context = [job for job in jobs if job.claim_id not in contexts]
        async with self._pool.acquire() as conn:
            inserted = {(r["claim_id"], r["kind"]) for r in await conn.fetch(
                _RESERVE, [j.claim_id for j in jobs], [j.kind for j in jobs],
                [contexts[j.claim_id].phone if j.claim_id in contexts else "" for j in jobs],
                [texts.get(j.message_id, "") for j in jobs],
                ["pending" if j.claim_id in contexts else "failed" for j in jobs],
                [None if j.claim_id in contexts else NO_CONTEXT for j in jobs])}
            replayed = [j for j in jobs if (j.claim_id, j.kind) not in inserted]
            existing = {(r["claim_id"], r["kind"]): r for r in await conn.fetch(
                _EXISTING, [j.claim_id for j in replayed], [j.kind for j in replayed])
            } if replayed else {}

        pending: list[_Pending] = []
        dead: list[DeadLetter] = []
        for job in no_context:
            if (job.claim_id, job.kind) in inserted:
                SMS_FAILED.labels(job.kind).inc()
                log.warning("SMS %s not sent: %s", job.message_id, NO_CONTEXT,
                            extra={"request_id": job.request_id})
                dead.append(DeadLetter(index_of[job.message_id], NO_CONTEXT))
        for job in jobs:
            key = (job.claim_id, job.kind)
            if key in inserted:
                if job.claim_id in contexts:
                    pending.append(_Pending(index_of[job.message_id], job,
                                            contexts[job.claim_id].phone,
                                            texts[job.message_id]))
            elif (row := existing.get(key)) is not None and row["status"] == "pending":
                # Written by an earlier try that never marked it: send what the row says.
                pending.append(_Pending(index_of[job.message_id], job, row["phone"],
                                        row["body"]))
            # Otherwise `sent` or `failed` before (and dead-lettered then): nothing to do.
        return pending, dead

    async def _deliver(self, message: _Pending) -> str | None:
        """None when sent; otherwise why it was given up on."""
        job = message.job
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retriable),
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_random_exponential(multiplier=self._backoff_base, max=self._backoff_max),
            before_sleep=lambda _state: SMS_RETRIED.labels(job.kind).inc(),
            reraise=True,
        )
        try:
            await retrying(self._attempt, message)
        except ProviderError as exc:
            return await self._give_up(message, retrying.statistics, exc)
        SMS_SENT.labels(job.kind).inc()
        log.info("SMS %s sent to %s", job.message_id, mask_phone(message.phone),
                 extra={"request_id": job.request_id})
        return None

    async def _attempt(self, message: _Pending) -> None:
        """One provider call under the rate limit, its outcome recorded on the row."""
        job = message.job
        async with self._in_flight:
            try:
                async with self._limiter:
                    await self._provider.send(job.message_id, message.phone, message.body)
            except ProviderError as exc:
                await self._pool.execute(_ATTEMPT_FAILED, job.claim_id, job.kind,
                                         _error_text(exc))
                raise
            await self._pool.execute(_SENT, job.claim_id, job.kind)

    async def _give_up(self, message: _Pending, statistics: dict[str, object],
                       exc: ProviderError) -> str | None:
        job = message.job
        status = await self._pool.execute(_GIVEN_UP, job.claim_id, job.kind)
        if status != "UPDATE 1":
            return None  # another consumer sent it meanwhile (a rebalance)
        attempts = statistics.get("attempt_number", 1)
        SMS_FAILED.labels(job.kind).inc()
        log.warning("SMS %s to %s given up after %s attempts: %s", job.message_id,
                    mask_phone(message.phone), attempts, _error_text(exc),
                    extra={"request_id": job.request_id})
        return f"provider failed after {attempts} attempts: {_error_text(exc)}"


def _error_text(exc: BaseException) -> str:
    return mask_personal_data(str(exc))[:_MAX_ERROR]


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    """Open the pool (and the provider's HTTP session), consume until `stopping`, close."""
    async with contextlib.AsyncExitStack() as resources:
        pool = await connect_pool(settings)
        resources.push_async_callback(pool.close)
        session = None
        if settings.sms_provider == "http":
            session = await resources.enter_async_context(aiohttp.ClientSession())
        processor = SmsProcessor(pool, provider_from_settings(settings, session), settings)
        runner: ConsumerRunner[SmsJob] = ConsumerRunner(settings, processor)
        await run_until(runner, stopping)


def main(settings: Settings) -> None:
    """`release-service consume sms`: until SIGTERM or SIGINT."""
    run_until_signalled(lambda stopping: serve(settings, stopping))
