"""SMS providers: where messages leave the system.

Every provider takes a client message id and honours it the way SMS gateways do: the same
id twice is one message. That closes the last gap of exactly-once delivery (a crash after
the provider accepted a message and before our row says `sent`): the replay resends under
the same id and the provider drops it.

Errors carry their behaviour, the way aiokafka's do: `ProviderError.retriable` says whether
the same request may succeed later (overload, timeout, outage) or never will (rejected).
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

from ..core.settings import Settings

DEFAULT_TIMEOUT_SECONDS = 5.0
# Statuses after which the same request may succeed: timeout, throttled, server side.
_RETRIABLE_STATUSES = frozenset({408, 429})


class ProviderError(Exception):
    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class SmsProvider(Protocol):
    async def send(self, message_id: str, phone: str, text: str) -> None:
        """Accepted when it returns; ProviderError otherwise. Idempotent on message_id."""
        ...


class SinkProvider:
    """Development and tests: every accepted message is one JSON line in a file
    (message_id, phone, text, sent_at), each message id at most once.

    One process owns a sink file: the set of ids is loaded once at start and kept in
    memory, guarded by a lock so concurrent sends of one id record it once.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = asyncio.Lock()
        self._seen: set[str] = set()
        self._needs_newline = False
        if self._path.exists():
            content = self._path.read_bytes()
            for line in content.splitlines():
                try:
                    self._seen.add(orjson.loads(line)["message_id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a crash mid-write: that message was not sent
            # Never glue the next record onto a torn last line.
            self._needs_newline = bool(content) and not content.endswith(b"\n")

    @property
    def path(self) -> Path:
        return self._path

    async def send(self, message_id: str, phone: str, text: str) -> None:
        async with self._lock:
            if message_id in self._seen:
                return
            line = orjson.dumps({"message_id": message_id, "phone": phone, "text": text,
                                 "sent_at": time.time()}) + b"\n"
            if self._needs_newline:
                line = b"\n" + line
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("ab") as sink:
                sink.write(line)
            self._needs_newline = False
            self._seen.add(message_id)


def sign(key: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of `{timestamp}.` followed by the raw body."""
    return hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(key: str, timestamp: str | int, body: bytes, signature: str,
                     now: float, max_skew: float = 300.0) -> bool:
    """For the provider side (and tests): signed with `key` over this body, and fresh
    (within `max_skew` seconds of `now`, so a captured request cannot be replayed later)."""
    timestamp = str(timestamp)
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(now - int(timestamp)) > max_skew:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), signature)


class HttpProvider:
    """A provider's HTTP API: a JSON POST signed with HMAC-SHA256 over timestamp and body,
    with the message id as `Idempotency-Key`."""

    def __init__(self, url: str, key: str, session: aiohttp.ClientSession,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._url = url
        self._key = key
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"HttpProvider({self._url!r})"  # never the key

    async def send(self, message_id: str, phone: str, text: str) -> None:
        body = orjson.dumps({"message_id": message_id, "phone": phone, "text": text})
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Timestamp": timestamp,
                   "X-Signature": sign(self._key, timestamp, body),
                   "Idempotency-Key": message_id}
        try:
            # A redirect would turn the POST into a GET elsewhere: a misconfigured URL.
            async with self._session.post(self._url, data=body, headers=headers,
                                          timeout=self._timeout,
                                          allow_redirects=False) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(f"provider unreachable: {type(exc).__name__}: {exc}",
                                retriable=True) from None
        if 200 <= status < 300:
            return
        retriable = status in _RETRIABLE_STATUSES or status >= 500
        raise ProviderError(f"provider answered {status}", retriable=retriable)


def provider_from_settings(settings: Settings,
                           session: aiohttp.ClientSession | None = None) -> SmsProvider:
    """The provider `settings.sms_provider` names; `http` needs the caller's session."""
    if settings.sms_provider == "http":
        if session is None:
            raise ValueError("sms_provider=http needs an aiohttp.ClientSession")
        return HttpProvider(settings.sms_provider_url, settings.sms_provider_key, session)
    return SinkProvider(settings.sms_sink_path)
