"""Redis connections: one client per process, for one server, a primary found through
Redis Sentinel (followed across failovers), or a Redis Cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.settings import PREFIX, Settings, SettingsError

AnyRedis: TypeAlias = Redis | RedisCluster

CLUSTER_SCHEME = "redis+cluster://"


def reply_text(value: bytes | str | int) -> str:
    """A reply value as text: our clients return bytes (no decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def reply_hash(reply: Mapping[Any, Any]) -> dict[str, str]:
    """An HGETALL reply as text."""
    return {reply_text(k): reply_text(v) for k, v in reply.items()}


async def pipelined(redis: AnyRedis, script: AsyncScript,
                    calls: Iterable[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
    """One call of `script` per (keys, args), in order, in one pipeline: one round trip
    for all (redis-py asks SCRIPT EXISTS first). Meant for one Redis node: redis-py's
    Cluster pipeline does not load the script first."""
    pipe = redis.pipeline(transaction=False)
    for script_keys, args in calls:
        # A script queued on a pipeline, as redis-py documents; its annotation names
        # clients only.
        await script(keys=script_keys, args=args, client=pipe)  # type: ignore[arg-type]
    replies: list[Any] = await pipe.execute()
    return replies


class _HiredisPacking(AbstractConnection):
    """Packs commands with hiredis, as redis-py's synchronous client does when hiredis is
    installed; its asyncio connection packs in Python, argument by argument (~1 µs each),
    and a batched claim call carries about four arguments per claim. (RedisCluster takes
    no connection class: its nodes keep redis-py's packing.)"""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]  # a name in words ("CONFIG SET") goes out as separate arguments
        if " " not in (command if isinstance(command, str) else command.decode("latin-1")):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        # A command name in several words ("CONFIG SET"), a bytearray or memoryview, or a
        # value no packer takes (DataError): redis-py's own hiredis path sorts them out.
        packed: list[bytes] = self._serializer.pack(*args)
        return packed


class _TCP(_HiredisPacking, Connection):
    pass


class _TLS(_HiredisPacking, SSLConnection):
    pass


class _Unix(_HiredisPacking, UnixDomainSocketConnection):
    pass


class _SentinelManaged(_HiredisPacking, SentinelManagedConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith("NOREPLICAS") or not self.connection_pool.is_master:
                raise
            # A primary without a replica in sync: cut off from the rest (the sentinels
            # promote another) or just promoted. Ask the sentinels again on reconnect.
            await self.disconnect()
            raise RedisConnectionError(f"{self.host}:{self.port} has no replica in "
                                       "sync (NOREPLICAS)") from exc


_HIREDIS_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TCP, SSLConnection: _TLS, UnixDomainSocketConnection: _Unix}

# A primary that is gone refuses or drops connections; one whose machine vanished, or
# that hangs, answers nothing: every call is bounded (a claim batch takes milliseconds,
# WAIT's own timeout is far below it), so a request gets its 503, not a hang.
CONNECT_TIMEOUT = 1.0
SOCKET_TIMEOUT = 5.0


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's connections as Sentinel names it, from a blocking pool (as for one
    server): idle connections to a primary that was replaced are dropped, and a
    connection that finds its server demoted (READONLY) reconnects to the new one."""

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()  # its own clients of the sentinels


def redis_client(settings: Settings, *, max_connections: int = 64) -> AnyRedis:
    """The client for the settings' topology: Sentinel when `redis_sentinels` is set,
    else by `redis_url` (one server, or `redis+cluster://`)."""
    if not settings.redis_sentinels:
        return redis_from_url(settings.redis_url, max_connections=max_connections)
    url = urlsplit(settings.redis_url)
    db = int(url.path.strip("/") or 0)
    pool = _BlockingSentinelPool(
        settings.redis_sentinel_master, sentinels_of(settings),
        connection_class=_SentinelManaged,
        max_connections=max_connections, timeout=5, db=db, password=url.password,
        username=url.username, socket_timeout=SOCKET_TIMEOUT, socket_keepalive=True,
        socket_connect_timeout=CONNECT_TIMEOUT, retry=_retry(),
        retry_on_error=list(RETRIED), health_check_interval=30)
    return Redis.from_pool(pool)  # closing the client closes the pool and its sentinels


async def follow_primary(redis: AnyRedis) -> None:
    """After a write the replicas did not confirm: ask the sentinels who the primary is;
    when it changed, idle connections to the old one are dropped (a primary cut off from
    its replicas keeps answering the connections that reach it)."""
    pool = redis.connection_pool if isinstance(redis, Redis) else None
    if isinstance(pool, SentinelConnectionPool):
        with contextlib.suppress(RedisConnectionError):
            await pool.get_master_address()


def sentinels_of(settings: Settings) -> Sentinel:
    sentinels = []
    for part in settings.redis_sentinels.split(","):
        host, _, port = part.strip().rpartition(":")
        sentinels.append((host, int(port)))
    # One try per sentinel: asking the next one is the retry.
    kwargs = {"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT,
              "retry": Retry(NoBackoff(), 0)}
    return Sentinel(sentinels, sentinel_kwargs=kwargs)


async def check_topology(settings: Settings) -> None:
    """At start: a sentinel list none of which answers, a primary name they do not
    monitor, or more `redis_min_replicas` than a primary has replicas is one clear
    SettingsError naming the setting, not a stream of 503s later."""
    if settings.redis_sentinels:
        sentinel = sentinels_of(settings)
        try:
            await sentinel.discover_master(settings.redis_sentinel_master)
        except MasterNotFoundError as exc:
            if "Error" in str(exc):  # every sentinel failed to answer
                raise SettingsError(f"{PREFIX}REDIS_SENTINELS={settings.redis_sentinels!r}: "
                                    "no sentinel answers") from None
            raise SettingsError(
                f"{PREFIX}REDIS_SENTINEL_MASTER={settings.redis_sentinel_master!r}: the "
                "sentinels monitor no primary of that name (or it is down)") from None
        finally:
            await sentinel.aclose()
    if settings.redis_min_replicas:
        redis = redis_client(settings, max_connections=1)
        try:
            info = await redis.info("replication")
        finally:
            await redis.aclose()
        # One server's INFO, or one per Cluster node (replicas report 0 of their own).
        shards = [info] if "connected_slaves" in info else \
            [i for i in info.values() if i.get("role") == "master"]
        replicas = min(int(i.get("connected_slaves", 0)) for i in shards)
        if replicas < settings.redis_min_replicas:
            raise SettingsError(
                f"{PREFIX}REDIS_MIN_REPLICAS={settings.redis_min_replicas}: the primary has "
                f"{replicas} replica(s) connected")


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=3)


RETRIED = (RedisConnectionError, RedisTimeoutError, ConnectionResetError)


def redis_from_url(url: str, *, max_connections: int = 64) -> AnyRedis:
    """`redis+cluster://host:port` selects redis-py's cluster client; anything else is one
    server. Commands retry on connection errors with backoff (bounded), so a Redis restart
    costs callers a short wait, not an exception, while it is short."""
    retry, errors = _retry(), RETRIED
    if url.startswith(CLUSTER_SCHEME):
        # Per node, and without a blocking pool: room for every in-flight script call.
        return RedisCluster.from_url(
            "redis://" + url[len(CLUSTER_SCHEME):], retry=retry, retry_on_error=list(errors),
            max_connections=max_connections * 8,
        )
    # Blocking pool: past max_connections a caller waits for a connection (bounded),
    # instead of failing, so a spike queues briefly rather than erroring.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, retry=retry,
        retry_on_error=list(errors), health_check_interval=30,
    )
    pool.connection_class = _HIREDIS_PACKING.get(pool.connection_class, pool.connection_class)
    return Redis(connection_pool=pool)
