"""Groups the requests that arrive in one event-loop tick into one call per key.

One EVALSHA costs the gateway about as much CPU as a whole HTTP request; sharing a call
(or a pipeline) between every claim of a tick is what lets one gateway process keep up
with a spike. Order within a batch is arrival order, so fairness is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

Req = TypeVar("Req")
Out = TypeVar("Out")

MAX_BATCH = 32
# The key of requests that all share one batch (one script call or pipeline per tick).
ONE_BATCH = ""

BATCH_SIZE = Histogram("release_redis_batch_size", "Requests sent to Redis in one call",
                       ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64))


class TickBatcher(Generic[Req, Out]):
    """Requests submitted in one event-loop tick go to `run` together, per key. `run`
    answers each request with its outcome, or with an exception that fails that request
    alone; an exception `run` raises fails them all."""

    def __init__(self, kind: str,
                 run: Callable[[str, Sequence[Req]], Awaitable[Sequence[Out | BaseException]]],
                 max_batch: int = MAX_BATCH) -> None:
        self._run = run
        self._max_batch = max_batch
        self._size = BATCH_SIZE.labels(kind)
        self._pending: dict[str, list[tuple[Req, asyncio.Future[Out]]]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()

    def submit(self, key: str, request: Req) -> asyncio.Future[Out]:
        loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = []
            loop.call_soon(self._flush, key)
        future: asyncio.Future[Out] = loop.create_future()
        pending.append((request, future))
        return future

    def _flush(self, key: str) -> None:
        pending = self._pending.pop(key)
        for start in range(0, len(pending), self._max_batch):
            chunk = pending[start:start + self._max_batch]
            task = asyncio.create_task(self._call(key, chunk))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _call(self, key: str, batch: list[tuple[Req, asyncio.Future[Out]]]) -> None:
        self._size.observe(len(batch))
        try:
            outcomes = await self._run(key, [request for request, _ in batch])
        except Exception as exc:  # every waiter gets the failure; none is left hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the request may have been cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def drain(self) -> None:
        """Wait for calls already sent: their effects happened and must be answered."""
        while self._pending or self._in_flight:
            await asyncio.sleep(0)
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
