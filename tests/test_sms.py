"""The SMS consumer: pure decode/render, the signed HTTP provider against a local server
that checks signatures, and delivery through real PostgreSQL with a provider that fails."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiokafka import ConsumerRecord

from consumers.runner import InvalidMessage
from consumers.sms import SmsContext, SmsJob, SmsProcessor, decode, render
from consumers.sms_providers import HttpProvider, ProviderError, SinkProvider, verify_signature
from release_service import topics

KEY = "provider-key"
EVENT = {"claim_id": "c1", "code": "12345678", "release_id": "r1", "slot_id": "s1",
         "person_id": "p1", "account_id": "a1", "status": "confirmed",
         "claimed_at_ms": 1_790_000_000_000}


def record(value: bytes, topic: str = topics.CLAIMS) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, 1, 0, 0, b"p1", value, None, 0, len(value), [])


def test_decode_a_claim_and_a_cancellation():
    job = decode(record(orjson.dumps(EVENT)))
    assert (job.kind, job.message_id, job.code) == ("confirmation", "c1:confirmation", "12345678")
    assert decode(record(orjson.dumps(EVENT), topics.CANCELLATIONS)).kind == "cancellation"


@pytest.mark.parametrize("value", [
    b"\x00not json", b"[]", orjson.dumps({**EVENT, "code": "1234"}),
    orjson.dumps({k: v for k, v in EVENT.items() if k != "account_id"}),
    orjson.dumps({**EVENT, "claim_id": 7}),
])
def test_decode_refuses_poison(value):
    with pytest.raises(InvalidMessage):
        decode(record(value))


def test_render_says_what_where_when_and_the_code_only():
    context = SmsContext("13812345678", "HPV9", 1, "cd-wuhou-01", "预防接种门诊",
                         datetime(2026, 12, 8, 1, 0, tzinfo=UTC))
    job = SmsJob("c1", "confirmation", "12345678", "r1", "s1", "a1")
    text = render(job, context, ZoneInfo("Asia/Shanghai"))
    assert "12345678" in text and "HPV9第1剂" in text and "cd-wuhou-01" in text
    assert "12月8日 09:00（周二）" in text
    assert "13812345678" not in text
    cancelled = render(dataclasses.replace(job, kind="cancellation"), context,
                       ZoneInfo("Asia/Shanghai"))
    assert "已取消" in cancelled and "12345678" in cancelled


async def test_sink_records_each_message_id_once(tmp_path):
    sink = SinkProvider(tmp_path / "sink.jsonl")
    await sink.send("m1", "13800000000", "hello")
    await sink.send("m1", "13800000000", "hello")
    await SinkProvider(tmp_path / "sink.jsonl").send("m1", "13800000000", "hello")
    assert len((tmp_path / "sink.jsonl").read_text().splitlines()) == 1


@pytest.fixture
async def provider_server():
    """A provider that verifies signatures; answers by the `text` it is sent."""
    received: list[dict] = []

    async def messages(request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify_signature(KEY, request.headers["X-Timestamp"], body,
                              request.headers["X-Signature"], time.time())
        if not ok:
            return web.json_response({"error": "bad signature"}, status=401)
        data = orjson.loads(body)
        assert request.headers["Idempotency-Key"] == data["message_id"]
        if data["text"] == "overloaded":
            return web.json_response({}, status=503)
        if data["text"] == "bad number":
            return web.json_response({}, status=400)
        received.append(data)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/messages", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/messages", received
    await runner.cleanup()


async def test_http_provider_signs_and_classifies_errors(provider_server):
    url, received = provider_server
    async with aiohttp.ClientSession() as session:
        await HttpProvider(url, KEY, session).send("m1", "13800000000", "你好")
        assert received == [{"message_id": "m1", "phone": "13800000000", "text": "你好"}]
        with pytest.raises(ProviderError) as overloaded:
            await HttpProvider(url, KEY, session).send("m2", "13800000000", "overloaded")
        assert overloaded.value.retriable
        with pytest.raises(ProviderError) as rejected:
            await HttpProvider(url, KEY, session).send("m3", "13800000000", "bad number")
        assert not rejected.value.retriable
        with pytest.raises(ProviderError) as forged:
            await HttpProvider(url, "wrong-key", session).send("m4", "13800000000", "hi")
        assert not forged.value.retriable
    assert len(received) == 1


def test_signature_check_rejects_tampering_and_staleness():
    from consumers.sms_providers import signature

    sig = signature(KEY, "1000", b'{"a":1}')
    assert verify_signature(KEY, "1000", b'{"a":1}', sig, now=1000)
    assert not verify_signature(KEY, "1000", b'{"a":2}', sig, now=1000)
    assert not verify_signature(KEY, "1000", b'{"a":1}', sig, now=5000)


class FlakyProvider:
    """Fails about half of all calls (retriable), deterministically; records successes."""

    def __init__(self, seed: int, failure_rate: float = 0.5, retriable: bool = True) -> None:
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.retriable = retriable
        self.calls = 0
        self.delivered: list[str] = []

    async def send(self, message_id: str, phone: str, text: str) -> None:
        self.calls += 1
        if self.rng.random() < self.failure_rate:
            raise ProviderError("provider hiccup", retriable=self.retriable)
        self.delivered.append(message_id)


async def bookings_for_sms(settings, count: int) -> list[SmsJob]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO releases (release_id, vaccine, dose, clinic_id, department, opens_at, "
            "closes_at, definition) VALUES ('r1', 'HPV9', 1, 'cd-wuhou-01', 'vaccination', "
            "now(), now() + interval '1 day', '{}')")
        await conn.execute(
            "INSERT INTO slots VALUES ('r1', 's1', now() + interval '7 days', "
            "now() + interval '7 days 1 hour', 1000)")
        await conn.executemany("INSERT INTO accounts (account_id, phone) VALUES ($1, $2)",
                               [(f"a{i}", f"1380000{i:04d}") for i in range(count)])
    finally:
        await conn.close()
    return [SmsJob(f"c{i}", "confirmation", f"{10_000_000 + i}", "r1", "s1", f"a{i}")
            for i in range(count)]


async def test_half_failing_provider_still_sends_each_sms_exactly_once(stack_settings):
    jobs = await bookings_for_sms(stack_settings, 200)
    pool = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=8)
    provider = FlakyProvider(seed=42)
    settings = dataclasses.replace(stack_settings, sms_max_attempts=40,
                                   sms_rate_per_second=10_000)
    try:
        processor = SmsProcessor(pool, provider, settings, backoff_seconds=0.001)
        assert await processor.handle(jobs) == []
        assert await processor.handle(jobs) == []  # a replayed batch sends nothing new
        statuses = Counter(r["status"] for r in await pool.fetch("SELECT status FROM sms_messages"))
        attempts = await pool.fetchval("SELECT sum(attempts) FROM sms_messages")
    finally:
        await pool.close()
    assert Counter(provider.delivered) == Counter({job.message_id: 1 for job in jobs})
    assert statuses == {"sent": 200}
    assert attempts == provider.calls > 200  # failures happened and were retried


async def test_permanent_failure_marks_failed_and_dead_letters(stack_settings):
    jobs = await bookings_for_sms(stack_settings, 3)
    jobs.append(SmsJob("c-orphan", "confirmation", "99999999", "r1", "s1", "no-such-account"))
    pool = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=4)
    provider = FlakyProvider(seed=1, failure_rate=1.0, retriable=False)
    try:
        dead = await SmsProcessor(pool, provider, stack_settings).handle(jobs)
        rows = await pool.fetch("SELECT claim_id, status, last_error FROM sms_messages")
        again = await SmsProcessor(pool, provider, stack_settings).handle(jobs)
    finally:
        await pool.close()
    assert sorted(d.index for d in dead) == [0, 1, 2, 3]
    assert {r["status"] for r in rows} == {"failed"} and len(rows) == 4
    assert provider.calls == 3  # one try each: not retriable; the orphan never reached it
    assert again == []  # given up on once; not dead-lettered twice
