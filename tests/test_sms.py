"""The SMS consumer: pure decode/render with plain records, the signed HTTP provider against
a local server that checks signatures, the sink's idempotency, and delivery through real
PostgreSQL with providers that fail."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiokafka import ConsumerRecord

from consumers.runner import InvalidMessage
from consumers.sms import SmsProcessor, _limiter, decode
from release_service.core import topics
from release_service.core.settings import Settings
from release_service.sms.messages import SmsContext, SmsJob, render
from release_service.sms.providers import (
    HttpProvider,
    ProviderError,
    SinkProvider,
    provider_from_settings,
    sign,
    verify_signature,
)

KEY = "provider-key"
SHANGHAI = ZoneInfo("Asia/Shanghai")
ID_NUMBER = "510107199001011234"
EVENT = {"claim_id": "c1", "code": "12345678", "release_id": "r1", "slot_id": "s1",
         "person_id": "p1", "account_id": "a1", "status": "confirmed",
         "claimed_at_ms": 1_790_000_000_000}


def record(value: bytes, topic: str = topics.CLAIMS,
           headers: list[tuple[str, bytes]] | None = None) -> ConsumerRecord:
    return ConsumerRecord(topic, 0, 1, 0, 0, b"p1", value, None, 0, len(value),
                          headers or [("event_type", b"claim.confirmed")])


# --- decode -------------------------------------------------------------------------------


def test_decode_a_claim_and_a_cancellation():
    job = decode(record(orjson.dumps(EVENT), headers=[("request_id", b"req-1")]))
    assert job == SmsJob("c1", "confirmation", "12345678", "r1", "s1", "a1", "req-1")
    assert job.message_id == "c1:confirmation"
    cancelled = decode(record(orjson.dumps({**EVENT, "status": "cancelled"}),
                              topics.CANCELLATIONS, [("event_type", b"claim.cancelled")]))
    assert (cancelled.kind, cancelled.message_id) == ("cancellation", "c1:cancellation")


@pytest.mark.parametrize("value", [
    b"\x00not json", b"", b"[]", b'"c1"',
    *(orjson.dumps({k: v for k, v in EVENT.items() if k != name})
      for name in ("claim_id", "code", "release_id", "slot_id", "account_id")),
    orjson.dumps({**EVENT, "claim_id": 7}),
    orjson.dumps({**EVENT, "account_id": ""}),
    orjson.dumps({**EVENT, "slot_id": "s" * 500}),
    orjson.dumps({**EVENT, "code": "1234"}),
    orjson.dumps({**EVENT, "code": "1234567a"}),
    orjson.dumps({**EVENT, "code": "１２３４５６７８"}),  # full-width digits
    orjson.dumps({**EVENT, "code": 12345678}),
], ids=lambda value: value[:40].decode(errors="replace"))
def test_decode_refuses_poison(value):
    with pytest.raises(InvalidMessage):
        decode(record(value))


def test_decode_refuses_a_topic_without_an_sms():
    with pytest.raises(InvalidMessage):
        decode(record(orjson.dumps(EVENT), topics.CLAIMS_DEAD_LETTER))


# --- render -------------------------------------------------------------------------------

CONTEXT = SmsContext("13812345678", "HPV9", 1, "cd-wuhou-01", "预防接种门诊",
                     datetime(2026, 12, 8, 1, 0, tzinfo=UTC))  # 09:00 in Shanghai, a Tuesday
JOB = SmsJob("c1", "confirmation", "12345678", "r1", "s1", "a1")


def test_render_a_confirmation_says_what_where_when_and_the_code():
    text = render(JOB, CONTEXT, SHANGHAI)
    assert text == ("【疫苗预约】您已成功预约HPV9第1剂：cd-wuhou-01预防接种门诊，"
                    "12月8日 09:00（周二），预约码 12345678。"
                    "请按时携带身份证件到场接种。如需取消请在截止时间前操作。")


def test_render_a_cancellation():
    text = render(dataclasses.replace(JOB, kind="cancellation"), CONTEXT, SHANGHAI)
    assert text == ("【疫苗预约】您在cd-wuhou-01预防接种门诊12月8日 09:00（周二）的HPV9第1剂预约"
                    "（预约码 12345678）已取消，名额已释放。")


def test_render_uses_the_clinic_zone_and_never_personal_data():
    late = dataclasses.replace(CONTEXT, starts_at=datetime(2026, 12, 31, 16, 30, tzinfo=UTC))
    text = render(JOB, late, SHANGHAI)
    assert "1月1日 00:30（周五）" in text  # the next day and year in the clinic's zone
    for kind in ("confirmation", "cancellation"):
        text = render(dataclasses.replace(JOB, kind=kind), CONTEXT, SHANGHAI)
        assert not re.search(r"[0-9]{11,}", text)  # no ID number, no phone number
        assert "13812345678" not in text and "p1" not in text


def test_a_slot_from_the_standby_list_is_confirmed_with_its_decline_deadline():
    until_ms = int(datetime(2026, 12, 1, 2, 30, tzinfo=UTC).timestamp() * 1000)
    job = decode(record(orjson.dumps({**EVENT, "via": "standby",
                                      "decline_until_ms": until_ms})))
    assert (job.kind, job.message_id, job.decline_until_ms) == (
        "confirmation", "c1:confirmation", until_ms)  # still one confirmation per booking
    text = render(job, CONTEXT, SHANGHAI)
    assert "候补成功" in text and "12345678" in text and "12月1日 10:30前放弃" in text
    with pytest.raises(InvalidMessage):
        decode(record(orjson.dumps({**EVENT, "via": "standby"})))


def test_a_lottery_notice_names_no_booking():
    notice = {"claim_id": "lottery-r1-7", "release_id": "r1", "person_id": "p1",
              "account_id": "a1", "entry": 7}
    job = decode(record(orjson.dumps(notice), topics.LOTTERY,
                        [("event_type", b"lottery.lost")]))
    assert (job.kind, job.message_id, job.code, job.slot_id) == (
        "lottery_lost", "lottery-r1-7:lottery_lost", "", "")
    text = render(job, dataclasses.replace(CONTEXT, starts_at=None), SHANGHAI)
    assert "未中签" in text and "HPV9第1剂" in text
    with pytest.raises(InvalidMessage):
        decode(record(orjson.dumps({**notice, "account_id": ""}), topics.LOTTERY))


def test_a_standby_skip_notice_says_why():
    notice = {"claim_id": "c9", "release_id": "r1", "person_id": "p1", "account_id": "a1",
              "reason": "limit_reached", "detail": "same_day_clinic"}
    job = decode(record(orjson.dumps(notice), topics.STANDBY))
    assert (job.kind, job.message_id, job.code, job.skip_reason) == (
        "standby_skipped", "c9:standby_skipped", "", "limit_reached:same_day_clinic")
    text = render(job, dataclasses.replace(CONTEXT, starts_at=None), SHANGHAI)
    assert "当天在该门诊已有预约" in text and "离开候补名单" in text
    odd = decode(record(orjson.dumps({**notice, "reason": "removed", "detail": ""}),
                        topics.STANDBY))
    assert "预约条件不满足" in render(odd, CONTEXT, SHANGHAI)
    with pytest.raises(InvalidMessage):
        decode(record(orjson.dumps({**notice, "reason": 3}), topics.STANDBY))


# --- providers ----------------------------------------------------------------------------


def test_signature_check_rejects_tampering_staleness_and_other_keys():
    body = b'{"a":1}'
    sig = sign(KEY, "1000", body)
    assert verify_signature(KEY, "1000", body, sig, now=1000)
    assert verify_signature(KEY, 1000, body, sig, now=1299)
    assert not verify_signature(KEY, "1000", b'{"a":2}', sig, now=1000)
    assert not verify_signature(KEY, "1000", body, sig, now=1301)
    assert not verify_signature("other-key", "1000", body, sig, now=1000)
    assert not verify_signature(KEY, "1000", body, sig.upper()[:-1], now=1000)
    assert not verify_signature(KEY, "not-a-time", body, sig, now=1000)


@dataclasses.dataclass
class ProviderServer:
    url: str
    received: list[dict]


@pytest.fixture
async def provider_server() -> AsyncIterator[ProviderServer]:
    """A provider that verifies signatures and answers by the `text` it is sent."""
    received: list[dict] = []

    async def messages(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(KEY, request.headers.get("X-Timestamp", ""), body,
                                request.headers.get("X-Signature", ""), time.time()):
            return web.json_response({"error": "bad signature"}, status=401)
        data = orjson.loads(body)
        if request.headers.get("Idempotency-Key") != data["message_id"]:
            return web.json_response({"error": "idempotency key"}, status=422)
        answers = {"overloaded": 503, "slow down": 429, "bad number": 400}
        if data["text"] in answers:
            return web.json_response({}, status=answers[data["text"]])
        if data["text"] == "slow":
            await asyncio.sleep(0.5)
        received.append(data)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/messages", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield ProviderServer(f"http://127.0.0.1:{port}/messages", received)
    finally:
        await runner.cleanup()


async def test_http_provider_sends_signed_json(provider_server):
    async with aiohttp.ClientSession() as session:
        await HttpProvider(provider_server.url, KEY, session).send("m1", "13800000000", "你好")
    assert provider_server.received == [
        {"message_id": "m1", "phone": "13800000000", "text": "你好"}]


@pytest.mark.parametrize(("text", "retriable"), [
    ("overloaded", True), ("slow down", True), ("bad number", False)])
async def test_http_provider_classifies_errors(provider_server, text, retriable):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ProviderError) as error:
            await HttpProvider(provider_server.url, KEY, session).send("m", "138", text)
    assert error.value.retriable is retriable
    assert provider_server.received == []


async def test_the_provider_rejects_a_tampered_body_and_a_wrong_key(provider_server):
    signed = orjson.dumps({"message_id": "m1", "phone": "13800000000", "text": "hi"})
    tampered = signed.replace(b"13800000000", b"13999999999")
    timestamp = str(int(time.time()))
    async with aiohttp.ClientSession() as session:
        async with session.post(provider_server.url, data=tampered, headers={
                "X-Timestamp": timestamp, "X-Signature": sign(KEY, timestamp, signed),
                "Idempotency-Key": "m1"}) as response:
            assert response.status == 401
        with pytest.raises(ProviderError) as forged:
            await HttpProvider(provider_server.url, "wrong-key", session).send("m2", "1", "hi")
    assert not forged.value.retriable
    assert provider_server.received == []


async def test_http_provider_unreachable_or_slow_is_retriable(provider_server):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ProviderError) as refused:
            await HttpProvider(f"http://127.0.0.1:{unused_port()}/messages", KEY,
                               session).send("m1", "13800000000", "hi")
        with pytest.raises(ProviderError) as timed_out:
            await HttpProvider(provider_server.url, KEY, session, timeout=0.1).send(
                "m2", "13800000000", "slow")
    assert refused.value.retriable and timed_out.value.retriable


def unused_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sink_records_each_message_id_once(tmp_path):
    path = tmp_path / "sms" / "sink.jsonl"
    sink = SinkProvider(path)
    await asyncio.gather(*(sink.send("m1", "13800000000", "hello") for _ in range(10)))
    await sink.send("m2", "13800000001", "hello again")
    await SinkProvider(path).send("m1", "13800000000", "hello")  # a restarted consumer
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert [line["message_id"] for line in lines] == ["m1", "m2"]
    assert lines[0]["phone"] == "13800000000" and lines[0]["text"] == "hello"
    assert isinstance(lines[0]["sent_at"], float)


async def test_sink_survives_a_line_torn_by_a_crash(tmp_path):
    path = tmp_path / "sink.jsonl"
    path.write_bytes(b'{"message_id":"m1","phone":"1","text":"a","sent_at":1.0}\n'
                     b'{"message_id":"m2","pho')
    sink = SinkProvider(path)
    await sink.send("m1", "1", "a")  # recorded before the crash: not again
    await sink.send("m2", "1", "b")  # torn: never accepted, so recorded now
    ids = []
    for line in path.read_bytes().splitlines():
        try:
            ids.append(orjson.loads(line)["message_id"])
        except orjson.JSONDecodeError:
            continue
    assert ids == ["m1", "m2"]


async def test_provider_from_settings(tmp_path):
    sink = provider_from_settings(Settings(sms_sink_path=str(tmp_path / "s.jsonl")))
    assert isinstance(sink, SinkProvider) and sink.path == tmp_path / "s.jsonl"
    http_settings = Settings(sms_provider="http", sms_provider_url="http://127.0.0.1:9/m",
                             sms_provider_key="secret")
    async with aiohttp.ClientSession() as session:
        provider = provider_from_settings(http_settings, session)
        assert isinstance(provider, HttpProvider) and "secret" not in repr(provider)
    with pytest.raises(ValueError):
        provider_from_settings(http_settings, None)


async def test_a_rate_below_one_per_second_is_a_valid_limit():
    limiter = _limiter(0.5)
    async with limiter:
        pass
    assert not limiter.has_capacity()


# --- delivery through PostgreSQL ----------------------------------------------------------


class FlakyProvider:
    """Fails a share of calls, deterministically (seeded); passes the rest to the sink."""

    def __init__(self, sink: SinkProvider, seed: int, failure_rate: float = 0.5,
                 retriable: bool = True) -> None:
        self.sink = sink
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.retriable = retriable
        self.calls: Counter[str] = Counter()

    async def send(self, message_id: str, phone: str, text: str) -> None:
        self.calls[message_id] += 1
        if self.rng.random() < self.failure_rate:
            raise ProviderError("provider hiccup for 13800001111", retriable=self.retriable)
        await self.sink.send(message_id, phone, text)


class CrashingProvider:
    """A bug, not a provider error: the batch must fail and be retried, nothing lost."""

    async def send(self, message_id: str, phone: str, text: str) -> None:
        raise RuntimeError("unexpected")


def sink_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_text().splitlines()] \
        if path.exists() else []


@pytest.fixture
async def pool(stack_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(stack_settings.database_url, min_size=1, max_size=8)
    try:
        yield created
    finally:
        await created.close()


async def bookings_for_sms(pool: asyncpg.Pool, count: int) -> list[SmsJob]:
    """`count` accounts, each with a named person (with an ID number) and one booking."""
    starts_at = datetime(2026, 12, 8, 1, 0, tzinfo=UTC)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO releases (release_id, vaccine, dose, clinic_id, department, opens_at, "
            "closes_at, definition) VALUES ('r1', 'HPV9', 1, 'cd-wuhou-01', 'vaccination', "
            "$1, $2, '{}')", starts_at - timedelta(days=7), starts_at - timedelta(days=6))
        await conn.execute("INSERT INTO slots VALUES ('r1', 's1', $1, $2, 1000)",
                           starts_at, starts_at + timedelta(hours=1))
        await conn.executemany("INSERT INTO accounts (account_id, phone) VALUES ($1, $2)",
                               [(f"a{i}", f"1380000{i:04d}") for i in range(count)])
        await conn.executemany(
            "INSERT INTO persons (person_id, account_id, real_name, id_number, birth_date, sex,"
            " is_holder) VALUES ($1, $2, '张小红', $3, '1990-01-01', 'F', true)",
            [(f"p{i}", f"a{i}", ID_NUMBER) for i in range(count)])
        await conn.executemany(
            "INSERT INTO bookings (claim_id, code, release_id, slot_id, person_id, account_id,"
            " claimed_at) VALUES ($1, $2, 'r1', 's1', $3, $4, now())",
            [(f"c{i}", f"{10_000_000 + i}", f"p{i}", f"a{i}") for i in range(count)])
    return [SmsJob(f"c{i}", "confirmation", f"{10_000_000 + i}", "r1", "s1", f"a{i}")
            for i in range(count)]


def fast(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **{"sms_rate_per_second": 10_000.0, **changes})


async def test_half_failing_provider_still_sends_each_sms_exactly_once(
        stack_settings, pool, tmp_path):
    confirmations = await bookings_for_sms(pool, 200)
    cancellations = [dataclasses.replace(j, kind="cancellation") for j in confirmations[:50]]
    jobs = confirmations + cancellations + confirmations[:10]  # and a few repeats in-batch
    sink_path = tmp_path / "sink.jsonl"
    provider = FlakyProvider(SinkProvider(sink_path), seed=42)
    processor = SmsProcessor(pool, provider, fast(stack_settings, sms_max_attempts=40),
                             backoff_base=0.001, backoff_max=0.01)

    assert await processor.handle(jobs) == []
    calls = provider.calls.total()
    assert await processor.handle(jobs) == []  # a replayed batch sends nothing new
    assert provider.calls.total() == calls

    lines = sink_lines(sink_path)
    expected = {job.message_id for job in confirmations + cancellations}
    assert Counter(line["message_id"] for line in lines) == Counter(
        {message_id: 1 for message_id in expected})
    assert calls > len(expected)  # failures happened and were retried
    rows = await pool.fetch("SELECT claim_id, kind, status, attempts, phone, body, sent_at "
                            "FROM sms_messages")
    assert len(rows) == len(expected)
    assert {r["status"] for r in rows} == {"sent"} and all(r["sent_at"] for r in rows)
    assert sum(r["attempts"] for r in rows) == calls
    by_id = {line["message_id"]: line for line in lines}
    for row in rows:
        line = by_id[f"{row['claim_id']}:{row['kind']}"]
        assert (line["phone"], line["text"]) == (row["phone"], row["body"])
    assert by_id["c7:confirmation"]["phone"] == "13800000007"
    assert "预约码 10000007" in by_id["c7:confirmation"]["text"]
    assert "已取消" in by_id["c7:cancellation"]["text"]
    assert all(ID_NUMBER not in line["text"] and "张小红" not in line["text"]
               for line in lines)


async def test_non_retriable_failure_marks_failed_and_dead_letters_once(
        stack_settings, pool, tmp_path):
    jobs = await bookings_for_sms(pool, 3)
    jobs.append(SmsJob("c-orphan", "confirmation", "99999999", "r1", "s1", "no-such-account"))
    provider = FlakyProvider(SinkProvider(tmp_path / "sink.jsonl"), seed=1, failure_rate=1.0,
                             retriable=False)
    processor = SmsProcessor(pool, provider, fast(stack_settings), backoff_base=0.001)

    dead = await processor.handle(jobs)
    assert [d.index for d in dead] == [0, 1, 2, 3]
    assert "no account phone" in dead[3].reason
    rows = {r["claim_id"]: r for r in await pool.fetch(
        "SELECT claim_id, status, attempts, last_error FROM sms_messages")}
    assert {r["status"] for r in rows.values()} == {"failed"} and len(rows) == 4
    assert rows["c0"]["attempts"] == 1 and rows["c0"]["last_error"]
    assert "13800001111" not in rows["c0"]["last_error"]  # phone numbers masked
    assert provider.calls == Counter({f"c{i}:confirmation": 1 for i in range(3)})

    assert await processor.handle(jobs) == []  # given up on once; not dead-lettered twice
    assert provider.calls.total() == 3
    assert not (tmp_path / "sink.jsonl").exists()


async def test_retriable_failures_give_up_after_the_last_attempt(stack_settings, pool, tmp_path):
    jobs = await bookings_for_sms(pool, 2)
    provider = FlakyProvider(SinkProvider(tmp_path / "sink.jsonl"), seed=3, failure_rate=1.0)
    processor = SmsProcessor(pool, provider, fast(stack_settings, sms_max_attempts=4),
                             backoff_base=0.001, backoff_max=0.01)

    dead = await processor.handle(jobs)
    assert [d.index for d in dead] == [0, 1]
    assert all("after 4 attempts" in d.reason for d in dead)
    assert provider.calls == Counter({"c0:confirmation": 4, "c1:confirmation": 4})
    rows = await pool.fetch("SELECT status, attempts, last_error FROM sms_messages")
    assert [(r["status"], r["attempts"]) for r in rows] == [("failed", 4)] * 2
    assert all("provider hiccup" in r["last_error"] for r in rows)


async def test_a_crashed_batch_leaves_rows_pending_and_the_replay_sends_them_once(
        stack_settings, pool, tmp_path):
    jobs = await bookings_for_sms(pool, 5)
    with pytest.raises(ExceptionGroup):
        await SmsProcessor(pool, CrashingProvider(), fast(stack_settings)).handle(jobs)
    assert {r["status"] for r in await pool.fetch("SELECT status FROM sms_messages")} == {
        "pending"}

    sink_path = tmp_path / "sink.jsonl"
    sink = SinkProvider(sink_path)
    # The provider accepted one of them before the crash (our row never said so).
    await sink.send("c0:confirmation", "13800000000", "accepted before the crash")
    assert await SmsProcessor(pool, sink, fast(stack_settings)).handle(jobs) == []
    lines = sink_lines(sink_path)
    assert sorted(line["message_id"] for line in lines) == sorted(j.message_id for j in jobs)
    statuses = await pool.fetch("SELECT status FROM sms_messages")
    assert [r["status"] for r in statuses] == ["sent"] * 5


async def test_sends_are_held_to_the_provider_rate(stack_settings, pool, tmp_path):
    jobs = await bookings_for_sms(pool, 30)
    processor = SmsProcessor(pool, SinkProvider(tmp_path / "sink.jsonl"),
                             dataclasses.replace(stack_settings, sms_rate_per_second=20.0))
    started = time.monotonic()
    assert await processor.handle(jobs) == []
    # A burst of 20, then 20 a second: the last 10 need about half a second.
    assert time.monotonic() - started >= 0.4
    assert len(sink_lines(tmp_path / "sink.jsonl")) == 30
