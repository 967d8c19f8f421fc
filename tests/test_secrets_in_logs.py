"""Secrets come from the environment or from files and never reach a log line or the
metrics; ID numbers and phones appear masked, even with DEBUG logging."""

from __future__ import annotations

import random

import aiohttp
import pytest
from processes import ServiceProcess, free_port
from support import Api, Resident, release_definition
from test_lifecycle import new_id, new_phone, sink_code

from release_service.settings import PREFIX, SettingsError, load_settings

SECRETS = ("admin_token", "token_secret", "code_secret")


def test_secrets_are_read_from_files(tmp_path):
    path = tmp_path / "token-secret"
    path.write_text("s" * 40 + "\n")
    settings = load_settings(environ={PREFIX + "TOKEN_SECRET_FILE": str(path)})
    assert settings.token_secret == "s" * 40
    assert "s" * 40 not in repr(settings) and "token_secret" not in settings.public_dict()
    with pytest.raises(SettingsError, match="TOKEN_SECRET_FILE: cannot read"):
        load_settings(environ={PREFIX + "TOKEN_SECRET_FILE": str(tmp_path / "missing")})


async def test_a_debug_gateway_logs_no_secret_and_no_personal_data(stack_settings, tmp_path):
    files = {}
    for name in SECRETS:
        files[f"{name}_file"] = str(tmp_path / name)
        (tmp_path / name).write_text(getattr(stack_settings, name))
    port = free_port()
    gateway = ServiceProcess(stack_settings, tmp_path, "gateway", name="debug-gateway",
                             http_port=port, log_level="DEBUG", **files).start()
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
                "POST", "/v1/sessions", json={"phone": phone, "code": sink_code(stack_settings,
                                                                                 phone),
                                              "real_name": "李娜", "id_number": id_number})
            assert status == 201, account
            me = Resident(account["account_id"], account["persons"][0]["person_id"],
                          account["token"])
            status, _, claim = await api.claim(release["release_id"], me)
            assert status == 201, claim
            assert (await api.call("GET", f"/v1/bookings/{claim['code']}",
                                   headers=me.headers))[0] == 200
            # Failures log more: a wrong admin token, a tampered token, malformed input.
            await api.call("GET", f"/v1/admin/releases/{release['release_id']}",
                           headers={"Authorization": "Bearer " + stack_settings.token_secret})
            await api.call("GET", "/v1/bookings",
                           headers={"Authorization": f"Bearer {me.token[:-2]}xx"})
            await api.call("POST", "/v1/persons", headers=me.headers,
                           json={"real_name": "李娜", "id_number": id_number[:-1] + "0"})
            async with session.get(url + "/metrics") as response:
                metrics = await response.text()
    finally:
        gateway.stop()
    log = gateway.log_path.read_text()
    assert '"level":"debug"' in log  # DEBUG really was on
    for text, what in ((log, "log"), (metrics, "metrics")):
        for name in SECRETS:
            assert getattr(stack_settings, name) not in text, (name, what)
        assert me.token not in text and me.token.split(".")[2] not in text, what
        assert phone not in text and id_number not in text, what
        assert id_number[:-1] + "0" not in text, what
