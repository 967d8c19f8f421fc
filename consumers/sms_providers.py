"""SMS providers: where messages leave the system.

Every provider takes a client message id and honours it the way SMS gateways do: the same
id twice is one message. That closes the last gap of exactly-once delivery (a crash after
the provider accepted a message and before our row says `sent`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson

from release_service.settings import Settings


class ProviderError(Exception):
    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class SmsProvider(Protocol):
    async def send(self, message_id: str, phone: str, text: str) -> None: ...


class SinkProvider:
    """Development and tests: every accepted message is one JSON line in a file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = asyncio.Lock()
        self._seen: set[str] = set()
        if path.exists():
            for line in path.read_bytes().splitlines():
                if line.strip():
                    self._seen.add(orjson.loads(line)["message_id"])

    async def send(self, message_id: str, phone: str, text: str) -> None:
        async with self._lock:
            if message_id in self._seen:
                return
            line = orjson.dumps({"message_id": message_id, "phone": phone, "text": text,
                                 "sent_at": time.time()})
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("ab") as sink:
                sink.write(line + b"\n")
            self._seen.add(message_id)


def signature(key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(key: str, timestamp: str, body: bytes, given: str, now: float,
                     max_skew: float = 300.0) -> bool:
    """For the provider side (and tests): fresh and signed with our key."""
    try:
        fresh = abs(now - float(timestamp)) <= max_skew
    except ValueError:
        return False
    return fresh and hmac.compare_digest(signature(key, timestamp, body), given)


class HttpProvider:
    """A provider's HTTP API: JSON body, HMAC-SHA256 signature over timestamp and body."""

    def __init__(self, url: str, key: str, session: aiohttp.ClientSession,
                 timeout: float = 5.0) -> None:
        self._url = url
        self._key = key
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def send(self, message_id: str, phone: str, text: str) -> None:
        body = orjson.dumps({"message_id": message_id, "phone": phone, "text": text})
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Timestamp": timestamp,
                   "X-Signature": signature(self._key, timestamp, body),
                   "Idempotency-Key": message_id}
        try:
            async with self._session.post(self._url, data=body, headers=headers,
                                          timeout=self._timeout) as response:
                if response.status < 300:
                    return
                retriable = response.status in (408, 429) or response.status >= 500
                raise ProviderError(f"provider answered {response.status}", retriable=retriable)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"provider unreachable: {exc!r}", retriable=True) from None


def provider_from_settings(settings: Settings, session: aiohttp.ClientSession) -> SmsProvider:
    if settings.sms_provider == "http":
        return HttpProvider(settings.sms_provider_url, settings.sms_provider_key, session)
    return SinkProvider(Path(settings.sms_sink_path))
