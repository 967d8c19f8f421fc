"""Secrets (admin token, token and code secrets, SMS provider key, the database password)
come from the environment or from files and never reach a log line or the metrics; ID
numbers and phones appear masked, even with DEBUG logging, and never in a metric."""

from __future__ import annotations

import random
import re
import secrets
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from processes import ServiceProcess, free_port
from support import Api, Resident, release_definition
from test_lifecycle import new_id, new_phone

from release_service.core.settings import PREFIX, SettingsError, load_settings
from release_service.sms.providers import verify_signature

SECRETS = ("admin_token", "token_secret", "code_secret")


def test_secrets_are_read_from_files(tmp_path):
    path = tmp_path / "token-secret"
    path.write_text("s" * 40 + "\n")
    settings = load_settings(environ={PREFIX + "TOKEN_SECRET_FILE": str(path)})
    assert settings.token_secret == "s" * 40
    assert "s" * 40 not in repr(settings) and "token_secret" not in settings.public_dict()
    with pytest.raises(SettingsError, match="TOKEN_SECRET_FILE: cannot read"):
        load_settings(environ={PREFIX + "TOKEN_SECRET_FILE": str(tmp_path / "missing")})


class Provider:
    """A local SMS provider on loopback: checks each request's signature with the key it
    shares with the gateway, records the messages, and fails for one phone (so the
    gateway's error path is logged too)."""

    def __init__(self, key: str, failing_phone: str) -> None:
        self.key, self.failing_phone = key, failing_phone
        self.received: list[dict] = []

    async def messages(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(self.key, request.headers.get("X-Timestamp", ""), body,
                                request.headers.get("X-Signature", ""), time.time()):
            return web.json_response({"error": "bad signature"}, status=401)
        data = orjson.loads(body)
        if data["phone"] == self.failing_phone:
            return web.json_response({"error": "overloaded"}, status=503)
        self.received.append(data)
        return web.json_response({"ok": True})

    def code_sent_to(self, phone: str) -> str:
        text = next(m["text"] for m in reversed(self.received) if m["phone"] == phone)
        return next(word for word in text.replace("，", " ").split() if word.isdigit())


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Provider, str]]:
    served = Provider("sms-key-" + secrets.token_hex(16), new_phone())
    app = web.Application()
    app.router.add_post("/messages", served.messages)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield served, f"http://127.0.0.1:{runner.addresses[0][1]}/messages"
    finally:
        await runner.cleanup()


def with_password(dsn: str, password: str) -> str:
    """The stack's DSN with a password (the test server trusts loopback and ignores it)."""
    parts = urlsplit(dsn)
    user = parts.username or ""
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_debug_gateway_logs_no_secret_and_no_personal_data(stack_settings, tmp_path,
                                                                  provider):
    sms, sms_url = provider
    values = {name: getattr(stack_settings, name) for name in SECRETS}
    values["sms_provider_key"] = sms.key
    values["database_url"] = with_password(stack_settings.database_url,
                                           "db-pw-" + secrets.token_hex(16))
    files = {}
    for name, value in values.items():
        files[f"{name}_file"] = str(tmp_path / name)
        (tmp_path / name).write_text(value)
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="debug-gateway",
                             http_port=port, log_level="DEBUG", sms_provider="http",
                             sms_provider_url=sms_url, **files).start()
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(3)
    phone, id_number = new_phone(), new_id(rng)
    try:
        gateway.wait_http(url + "/healthz")
        async with aiohttp.ClientSession() as session:
            api = Api(session, url, stack_settings.admin_token)
            release = await api.create_release(release_definition([5]))
            assert (await api.call("POST", "/v1/otp", json={"phone": phone}))[0] == 202
            status, _, account = await api.call(
                "POST", "/v1/sessions", json={"phone": phone, "code": sms.code_sent_to(phone),
                                              "real_name": "李娜", "id_number": id_number})
            assert status == 201, account
            me = Resident(account["account_id"], account["persons"][0]["person_id"],
                          account["token"])
            status, _, claim = await api.claim(release["release_id"], me)
            assert status == 201, claim
            assert (await api.call("GET", f"/v1/bookings/{claim['code']}",
                                   headers=me.headers))[0] == 200
            # Failures log more: a wrong admin token, a tampered token, malformed input,
            # a provider that fails, a resend before the booking is persisted.
            await api.call("GET", f"/v1/admin/releases/{release['release_id']}",
                           headers={"Authorization": "Bearer " + stack_settings.token_secret})
            await api.call("GET", "/v1/bookings",
                           headers={"Authorization": f"Bearer {me.token[:-2]}xx"})
            await api.call("POST", "/v1/persons", headers=me.headers,
                           json={"real_name": "李娜", "id_number": id_number[:-1] + "0"})
            assert (await api.call("POST", "/v1/otp", json={"phone": sms.failing_phone})
                    )[0] == 503
            await api.call("POST", f"/v1/bookings/{claim['code']}/resend-sms",
                           headers=me.headers)
            async with session.get(url + "/metrics") as response:
                metrics = await response.text()
    finally:
        gateway.stop()
    log = gateway.log_path.read_text()
    assert '"level":"debug"' in log  # DEBUG really was on
    password = urlsplit(values["database_url"]).password
    for text, what in ((log, "log"), (metrics, "metrics")):
        for name, value in values.items():
            assert value not in text, (name, what)
        assert password and password not in text, what
        assert me.token not in text and me.token.split(".")[2] not in text, what
        for personal in (phone, sms.failing_phone, id_number, id_number[:-1] + "0"):
            assert personal not in text, what
    # Not even masked: personal data is never a metric label (one series per person).
    assert not re.search(r"1[0-9]{2}\*{4}[0-9]{4}|[0-9]{3}\*{13}", metrics)
