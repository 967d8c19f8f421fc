"""Redis connections: one client per process, standalone or Cluster chosen by the URL."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


_HIREDIS_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TCP, SSLConnection: _TLS, UnixDomainSocketConnection: _Unix}


def redis_from_url(url: str, *, max_connections: int = 64) -> AnyRedis:
    """`redis+cluster://host:port` selects redis-py's cluster client; anything else is one
    server. Commands retry on connection errors with backoff (bounded), so a Redis restart
    costs callers a short wait, not an exception, while it is short."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=3)
    errors = (RedisConnectionError, RedisTimeoutError, ConnectionResetError)
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
