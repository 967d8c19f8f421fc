"""Settings: defaults < settings file < environment < keyword overrides, validated once."""

from __future__ import annotations

import pytest

from release_service.core.settings import (
    Settings,
    SettingsError,
    load_settings,
    read_settings_file,
    write_settings_file,
)


@pytest.fixture(autouse=True)
def _away_from_any_stack(tmp_path, monkeypatch):
    # load_settings falls back to ./.stack/settings.env: never read a developer's stack.
    monkeypatch.chdir(tmp_path)


def test_defaults_without_file_or_environment():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.redis_appendfsync == "everysec"
    assert settings.kafka_enable_idempotence is False  # Tansu rejects the idempotent producer


def test_environment_wins_over_the_file_and_overrides_win_over_both(tmp_path):
    path = tmp_path / "settings.env"
    write_settings_file(path, {"http_port": 9000, "admin_token": "from-file",
                               "log_level": "DEBUG"})
    environ = {"RELEASE_SERVICE_SETTINGS_FILE": str(path), "RELEASE_SERVICE_HTTP_PORT": "9100"}
    settings = load_settings(environ)
    assert (settings.http_port, settings.admin_token, settings.log_level) == \
        (9100, "from-file", "DEBUG")
    assert load_settings(environ, http_port=9200).http_port == 9200


def test_the_stack_folder_file_is_found_through_stack_dir(tmp_path):
    write_settings_file(tmp_path / "elsewhere" / "settings.env", {"http_port": 9300})
    settings = load_settings({"RELEASE_SERVICE_STACK_DIR": str(tmp_path / "elsewhere")})
    assert settings.http_port == 9300


def test_values_are_typed():
    settings = load_settings({
        "RELEASE_SERVICE_KAFKA_ENABLE_IDEMPOTENCE": "yes",
        "RELEASE_SERVICE_SMS_RATE_PER_SECOND": "12.5",
        "RELEASE_SERVICE_GATEWAY_PROCESSES": "4",
    })
    assert settings.kafka_enable_idempotence is True
    assert settings.sms_rate_per_second == 12.5
    assert settings.gateway_processes == 4


def test_secrets_are_not_in_repr_nor_in_the_public_view(tmp_path):
    settings = load_settings({}, admin_token="adm-s3cret", token_secret="tok-s3cret",
                             code_secret="code-s3cret", sms_provider_key="sms-s3cret",
                             database_url="postgresql://release:db-s3cret@db:5432/release",
                             redis_url="redis://:redis-s3cret@cache:6379/0")
    shown = repr(settings) + repr(settings.public_dict())
    for secret in ("adm-s3cret", "tok-s3cret", "code-s3cret", "sms-s3cret", "db-s3cret",
                   "redis-s3cret"):
        assert secret not in shown
    assert "admin_token" not in settings.public_dict()
    assert settings.public_dict()["database_url"] == "postgresql://release:***@db:5432/release"
    assert settings.public_dict()["http_port"] == 8080


def test_the_settings_file_is_private_and_round_trips(tmp_path):
    path = tmp_path / "settings.env"
    write_settings_file(path, {"admin_token": "x=y", "http_port": 81})
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_settings_file(path) == {"RELEASE_SERVICE_ADMIN_TOKEN": "x=y",
                                        "RELEASE_SERVICE_HTTP_PORT": "81"}


@pytest.mark.parametrize(("name", "value"), [
    ("HTTP_PORT", "99999"), ("HTTP_PORT", "http"), ("REDIS_URL", "http://x"),
    ("DATABASE_URL", "mysql://x"), ("KAFKA_BOOTSTRAP", "nohost"),
    ("TIMEZONE", "Mars/Olympus"), ("KAFKA_ENABLE_IDEMPOTENCE", "maybe"), ("NOPE", "1"),
    ("SMS_PROVIDER", "carrier-pigeon"), ("REDIS_APPENDFSYNC", "no"),
    ("KAFKA_PARTITIONS", "0"), ("SMS_RATE_PER_SECOND", "fast"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=f"RELEASE_SERVICE_{name}"):
        load_settings({f"RELEASE_SERVICE_{name}": value})


def test_bad_file_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "settings.env"
    path.write_text("# comment\n\nRELEASE_SERVICE_HTTP_PORT=81\nHTTP_PORT=82\n")
    with pytest.raises(SettingsError, match=r"settings\.env:4"):
        load_settings({"RELEASE_SERVICE_SETTINGS_FILE": str(path)})


def test_a_named_settings_file_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"RELEASE_SERVICE_SETTINGS_FILE": str(tmp_path / "missing.env")})


def test_http_provider_needs_its_url():
    with pytest.raises(SettingsError, match="RELEASE_SERVICE_SMS_PROVIDER_URL"):
        load_settings({"RELEASE_SERVICE_SMS_PROVIDER": "http"})
