"""Settings: parsed and validated once at start into a frozen dataclass.

Sources, later wins: built-in defaults, the settings file, `RELEASE_SERVICE_*` environment
variables. The settings file holds `RELEASE_SERVICE_NAME=value` lines (the format
`stack up` writes); it is `$RELEASE_SERVICE_SETTINGS_FILE` when set, else
`.stack/settings.env` in the working directory when that exists.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PREFIX = "RELEASE_SERVICE_"
DEFAULT_STACK_DIR = Path(".stack")
SETTINGS_FILE_NAME = "settings.env"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and says what is expected."""


def _secret() -> Any:
    # Secrets never show in repr() or logs.
    return field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: when set, the primary of `redis_sentinel_master` is found through
    # these sentinels (host:port,...) and followed across failovers; `redis_url` then
    # gives only the database number and password.
    redis_sentinels: str = ""
    redis_sentinel_master: str = ""
    # A write a resident is told about is answered only once it reached this many replicas
    # (WAIT in the same round trip); 0 = acknowledged by the primary alone.
    redis_min_replicas: int = 0
    # How long a write waits for those replicas before the request is answered 503.
    redis_replica_timeout_ms: int = 500
    kafka_bootstrap: str = "127.0.0.1:9092"
    database_url: str = "postgresql://release:release@127.0.0.1:5432/release"
    admin_token: str = _secret()
    token_secret: str = _secret()
    code_secret: str = _secret()
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Several gateway processes share the port through SO_REUSEPORT.
    gateway_processes: int = 1
    # /metrics of the relay and consumers (the gateway serves its own); 0 = off.
    metrics_port: int = 0
    # Apache Kafka: turn on. Tansu (development) rejects the idempotent producer.
    kafka_enable_idempotence: bool = False
    kafka_partitions: int = 8
    kafka_replication_factor: int = 1
    relay_in_gateway: bool = False
    timezone: str = "Asia/Shanghai"
    token_ttl_seconds: int = 7 * 24 * 3600
    max_body_bytes: int = 16 * 1024
    # The HTTP parser's bounds: one header line (request line included), and how many
    # headers; past them 400 or 431 before any handler runs.
    max_header_bytes: int = 8190
    max_headers: int = 64
    # A connection must send a whole request head within this many seconds of opening, or
    # of its previous answer; then it is closed (so idle keep-alive connections too).
    # Slow clients (slowloris) cannot hold connections or memory for long.
    header_timeout_seconds: float = 15.0
    # A request body must arrive within this many seconds: past it 408, so that slow
    # bodies cannot hold the in-flight slots (max_in_flight) the others need.
    body_timeout_seconds: float = 10.0
    # Requests a gateway process works on at once; past it: 503 with Retry-After at once
    # (no unbounded queue while a spike is ten times what the process can serve).
    max_in_flight: int = 2000
    # How often each gateway refreshes its local view of releases (sold out, paused...).
    release_view_refresh_seconds: float = 0.2
    database_pool_size: int = 10
    sms_provider: str = "sink"
    sms_sink_path: str = ".stack/sms-sink.jsonl"
    sms_provider_url: str = ""
    sms_provider_key: str = _secret()
    sms_rate_per_second: float = 200.0
    sms_max_attempts: int = 5
    # Platform-wide per-person booking limits (-1 = none); a release may override them.
    limit_same_day_clinic: int = 1
    limit_per_day: int = 2
    limit_per_7_days: int = 3
    limit_per_3_months: int = 5
    # A standby booking (a cancelled slot handed to the standby list) may be declined for
    # this long; a handoff a gateway left unfinished (it died) is resumed after this long.
    standby_decline_seconds: float = 1800.0
    standby_resume_seconds: float = 10.0
    # Rate limits shared by every gateway process (0 = none). A refused request gets 429
    # with Retry-After. Lookup misses (a code that is not yours) have a budget of their
    # own so that guessing booking codes is hopeless: see README "Rate limits".
    rate_claims_per_account_per_minute: int = 30
    rate_claims_per_address_per_minute: int = 600
    rate_lookups_per_account_per_minute: int = 60
    rate_lookups_per_address_per_minute: int = 600
    rate_lookup_misses_per_account_per_hour: int = 20
    rate_lookup_misses_per_address_per_hour: int = 100
    rate_otp_per_phone_per_day: int = 10
    rate_otp_per_address_per_hour: int = 30
    # Addresses no per-address limit applies to (load generators on this host).
    rate_limit_exempt_addresses: str = "127.0.0.1,::1"
    # Proxies whose X-Forwarded-For is believed (comma-separated addresses); from any
    # other peer the header is ignored, so clients cannot pick their own address.
    trusted_proxies: str = ""
    # How often the no-show pass runs inside the relay process.
    no_show_interval_seconds: float = 300.0
    redis_appendfsync: str = "everysec"
    reconcile_grace_seconds: float = 30.0
    # A relay's unacknowledged outbox entries this old are taken over by another relay.
    relay_takeover_seconds: float = 15.0
    log_level: str = "INFO"
    stack_dir: str = str(DEFAULT_STACK_DIR)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def public_dict(self) -> dict[str, Any]:
        """Every setting except the secrets (and a URL's password), for `--show-settings`
        and start-up logs."""
        return {
            f.name: _without_password(getattr(self, f.name)) if f.name.endswith("_url")
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.repr
        }

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"Settings({shown})"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)
                          ).geturl()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def read_settings_file(path: Path) -> dict[str, str]:
    """`NAME=value` lines; blank lines and `#` comments ignored; unknown names rejected."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().startswith(PREFIX):
            raise SettingsError(f"{path}:{number}: expected {PREFIX}NAME=value, got {line!r}")
        values[name.strip()] = value.strip()
    return values


def write_settings_file(path: Path, values: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{PREFIX}{name.upper()}={value}" for name, value in values.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# written by `release-service stack up`\n" + "\n".join(lines) + "\n")
    tmp.chmod(0o600)  # holds secrets
    tmp.replace(path)


def default_settings_file(environ: Mapping[str, str]) -> Path | None:
    explicit = environ.get(PREFIX + "SETTINGS_FILE")
    if explicit:
        return Path(explicit)
    stack_dir = Path(environ.get(PREFIX + "STACK_DIR", str(DEFAULT_STACK_DIR)))
    candidate = stack_dir / SETTINGS_FILE_NAME
    return candidate if candidate.exists() else None


def _convert(name: str, raw: str) -> object:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from None
    return raw


def _validate(s: Settings) -> None:
    def bad(name: str, why: str) -> SettingsError:
        return SettingsError(f"{PREFIX}{name.upper()}={getattr(s, name)!r}: {why}")

    if urlsplit(s.redis_url).scheme not in {"redis", "rediss", "redis+cluster", "unix"}:
        raise bad("redis_url", "expected redis://host:port/db or redis+cluster://host:port")
    if s.redis_sentinels:
        for part in s.redis_sentinels.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise bad("redis_sentinels", "expected host:port[,host:port...]")
        if not s.redis_sentinel_master:
            raise bad("redis_sentinel_master", "required with redis_sentinels: the name the "
                      "sentinels monitor")
        if urlsplit(s.redis_url).scheme == "redis+cluster":
            raise bad("redis_sentinels", "Redis Cluster fails over by itself: set "
                      "redis_sentinels or a redis+cluster:// URL, not both")
    elif s.redis_sentinel_master:
        raise bad("redis_sentinels", "required with redis_sentinel_master")
    if s.redis_min_replicas < 0:
        raise bad("redis_min_replicas", "expected 0 (primary only) or a number of replicas")
    if s.redis_replica_timeout_ms < 1:
        raise bad("redis_replica_timeout_ms", "expected a positive number of milliseconds")
    if urlsplit(s.database_url).scheme not in {"postgresql", "postgres"}:
        raise bad("database_url", "expected postgresql://user:password@host:port/database")
    for part in s.kafka_bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise bad("kafka_bootstrap", "expected host:port[,host:port...]")
    if not 0 < s.http_port < 65536:
        raise bad("http_port", "expected a TCP port between 1 and 65535")
    for name in ("gateway_processes", "kafka_partitions", "kafka_replication_factor",
                 "database_pool_size", "sms_max_attempts", "token_ttl_seconds",
                 "max_body_bytes", "max_in_flight", "max_header_bytes", "max_headers"):
        if getattr(s, name) < 1:
            raise bad(name, "expected a positive number")
    for name in [f.name for f in dataclasses.fields(s) if f.name.startswith("rate_")
                 and f.type == "int"]:
        if getattr(s, name) < 0:
            raise bad(name, "expected 0 (no limit) or a positive number")
    for name in ("rate_limit_exempt_addresses", "trusted_proxies"):
        for address in filter(None, (a.strip() for a in getattr(s, name).split(","))):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise bad(name, "expected comma-separated IP addresses") from None
    for name in ("sms_rate_per_second", "release_view_refresh_seconds",
                 "header_timeout_seconds", "body_timeout_seconds"):
        if getattr(s, name) <= 0:
            raise bad(name, "expected a positive number")
    if s.sms_provider not in {"sink", "http"}:
        raise bad("sms_provider", "expected sink or http")
    if s.sms_provider == "http" and not s.sms_provider_url:
        raise bad("sms_provider_url", "required when sms_provider=http")
    if s.redis_appendfsync not in {"everysec", "always"}:
        raise bad("redis_appendfsync", "expected everysec or always")
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad("timezone", "expected an IANA time zone such as Asia/Shanghai") from None


# Settings that may come from a file (NAME_FILE=path: container and Kubernetes secrets),
# so that they need not sit in the environment of every process.
FILE_SETTINGS = frozenset({"admin_token", "token_secret", "code_secret", "sms_provider_key",
                           "database_url", "redis_url"})


def _read_secret_file(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{key}: cannot read {path} ({exc.strerror})") from None


def load_settings(
    environ: Mapping[str, str] | None = None, **overrides: object
) -> Settings:
    """Defaults < settings file < environment < keyword overrides; validated."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    settings_file = default_settings_file(env)
    if settings_file is not None:
        if not settings_file.exists():
            raise SettingsError(f"settings file {settings_file} does not exist")
        raw.update(read_settings_file(settings_file))
    raw.update({k: v for k, v in env.items() if k.startswith(PREFIX)})

    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):].lower()
        if name in {"settings_file"}:
            continue
        if name.endswith("_file") and name[:-5] in FILE_SETTINGS:
            name, value = name[:-5], _read_secret_file(key, value)
        elif name not in _FIELDS:
            raise SettingsError(f"unknown setting {key}")
        values[name] = _convert(name, value)
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(settings)
    return settings
