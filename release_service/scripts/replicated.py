"""Script calls whose writes are acknowledged only once they reached `min_replicas`
replicas: the EVALSHA and a `WAIT min_replicas timeout` go in one pipeline, so on one
connection (WAIT counts the replicas that have that connection's writes) and in one round
trip. A batch the replicas did not confirm in time raises `ReplicasBehind`: its writes
may or may not survive a failover, so nothing in it may be told as done; a retry with the
same idempotency key finds out which.

What this does not promise (WAIT is no consensus): a write that reached k replicas can
still be lost if the failover promotes a replica that was not among them, and a write
WAIT gave up on may survive. With one primary, replication is a single ordered stream, so
a WAIT also covers every write that primary took before it (the person's reservation
before the claim).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError

from ..core.errors import ReplicasBehind
from .client import AnyRedis


class ReplicatedScript:
    """A registered Lua script, called as redis-py's Script is, plus the replicas' WAIT."""

    def __init__(self, redis: AnyRedis, source: str, min_replicas: int = 0,
                 timeout_ms: int = 500) -> None:
        if min_replicas and isinstance(redis, RedisCluster):
            # WAIT must share the script's connection; redis-py's cluster client gives
            # no such pair of commands to one node.
            raise ValueError("redis_min_replicas > 0 needs one server or Sentinel, not "
                             "Redis Cluster")
        self._redis = redis
        self._script = redis.register_script(source)
        self.min_replicas = min_replicas
        self._timeout_ms = timeout_ms

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if not self.min_replicas:
            return await self._script(keys=keys, args=args)
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
            if isinstance(reply, BaseException):
                raise reply
            if isinstance(acknowledged, BaseException):
                raise acknowledged
            if int(acknowledged) < self.min_replicas:
                raise ReplicasBehind(
                    f"the write reached {acknowledged} of the {self.min_replicas} replicas "
                    "it needs; retry with the same Idempotency-Key", retry_after=1)
            return reply
        raise AssertionError("unreachable")
