"""Script calls whose writes are acknowledged only once they reached `min_replicas`
replicas: the EVALSHA and a `WAIT min_replicas timeout` go in one pipeline, so on one
connection (WAIT counts the replicas that have that connection's writes) and in one round
trip. A batch the replicas did not confirm in time raises `ReplicasBehind` (or, through
`call`, comes back marked unconfirmed): its writes may or may not survive a failover, so
nothing in it may be told as done; a retry with the same idempotency key finds out which.

What this does not promise (WAIT is no consensus): a write that reached k replicas can
still be lost if the failover promotes a replica that was not among them, and a write
WAIT gave up on may survive. With one primary, replication is a single ordered stream, so
a WAIT also covers every write that primary took before it (the person's reservation
before the claim); on Redis Cluster only the writes of the same shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.errors import ReplicasBehind, ServiceError
from .client import AnyRedis, follow_primary

# A Cluster shard that moved or failed over: its slot map is fetched again and the call
# repeated (NOSCRIPT, MOVED and ASK mean the script did not run there). Past these
# attempts the call fails as a connection error, answered 503.
CLUSTER_ATTEMPTS = 5
CLUSTER_MOVED = (AskError, ClusterDownError, TryAgainError)  # MovedError is an AskError


class ReplicatedScript:
    """A registered Lua script, called as redis-py's Script is, plus the replicas' WAIT."""

    def __init__(self, redis: AnyRedis, source: str, min_replicas: int = 0,
                 timeout_ms: int = 500) -> None:
        self._redis = redis
        self._script = redis.register_script(source)
        self.min_replicas = min_replicas
        self._timeout_ms = timeout_ms

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        reply, confirmed = await self.call(keys, args)
        if not confirmed:
            raise self.behind()
        return reply

    def behind(self) -> ServiceError:
        return ReplicasBehind(f"the write has not reached the {self.min_replicas} "
                              "replicas it needs; retry with the same Idempotency-Key",
                              retry_after=1)

    async def call(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, bool]:
        """The script's reply, and whether its writes reached the replicas in time."""
        if not self.min_replicas:
            return await self._script(keys=keys, args=args), True
        if isinstance(self._redis, RedisCluster):
            return await self._on_cluster(self._redis, keys, args)
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas, self._timeout_ms)
            reply, acknowledged = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 0:
                # A new primary (failover) or a restart has an empty script cache; the
                # script did not run, so loading it and calling again is safe.
                await self._redis.script_load(self._script.script)
                continue
            return await self._confirmed(reply, acknowledged)
        raise AssertionError("unreachable")

    async def _on_cluster(self, redis: RedisCluster, keys: Sequence[Any],
                          args: Sequence[Any]) -> tuple[Any, bool]:
        """The same pair on the shard that owns the keys: redis-py's cluster pipeline
        sends a keyless WAIT elsewhere, so the pair goes to the key's node as one batch on
        one of its connections (as that pipeline does per node)."""
        for attempt in range(CLUSTER_ATTEMPTS):
            await redis.initialize()  # a no-op once the slot map is known
            node = redis.get_node_from_key(keys[0])
            if node is None:
                raise RedisConnectionError(f"no Redis Cluster node owns {keys[0]!r}")
            commands = [PipelineCommand(0, "EVALSHA", self._script.sha, len(keys), *keys,
                                        *args),
                        PipelineCommand(1, "WAIT", self.min_replicas, self._timeout_ms)]
            try:
                await node.execute_pipeline(commands)
            # AttributeError: redis-py's node connection, failing to connect to a node
            # that is down, can leave its writer unset and fail on it.
            except (RedisConnectionError, RedisTimeoutError, OSError, AttributeError):
                await self._remap(redis, attempt)
                continue
            reply, acknowledged = commands[0].result, commands[1].result
            if isinstance(reply, NoScriptError):
                await node.execute_command("SCRIPT", "LOAD", self._script.script)
                continue
            if isinstance(reply, (*CLUSTER_MOVED, RedisConnectionError, RedisTimeoutError)):
                await self._remap(redis, attempt)
                continue
            return await self._confirmed(reply, acknowledged)
        raise RedisConnectionError(f"the Redis Cluster shard of {keys[0]!r} did not answer "
                                   f"in {CLUSTER_ATTEMPTS} attempts (failing over?)")

    @staticmethod
    async def _remap(redis: RedisCluster, attempt: int) -> None:
        await asyncio.sleep(0.05 * 2 ** attempt)
        with contextlib.suppress(RedisError, OSError):  # the next attempt says
            await redis.nodes_manager.initialize()

    async def _confirmed(self, reply: Any, acknowledged: Any) -> tuple[Any, bool]:
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(acknowledged, BaseException):
            raise acknowledged
        if int(acknowledged) < self.min_replicas:
            await follow_primary(self._redis)  # a primary demoted meanwhile answers so too
            return reply, False
        return reply, True
