"""Groups the claims that arrive in one event-loop tick into one script call per release.

One EVALSHA costs the gateway about as much CPU as a whole HTTP request; sharing it
between every claim of a tick is what lets one gateway process keep up with a spike.
Order within a batch is arrival order, so fairness is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from .claim_script import ClaimOutcome, ClaimRequest
from .metrics import CLAIM_BATCH_SIZE

ClaimRunner = Callable[[str, Sequence[ClaimRequest]], Awaitable[list[ClaimOutcome]]]

MAX_BATCH = 32


class ClaimBatcher:
    def __init__(self, run: ClaimRunner, max_batch: int = MAX_BATCH) -> None:
        self._run = run
        self._max_batch = max_batch
        self._pending: dict[str, list[tuple[ClaimRequest, asyncio.Future[ClaimOutcome]]]] = {}
        self._in_flight: set[asyncio.Task[None]] = set()

    def submit(self, release_id: str, request: ClaimRequest) -> asyncio.Future[ClaimOutcome]:
        loop = asyncio.get_running_loop()
        pending = self._pending.get(release_id)
        if pending is None:
            pending = self._pending[release_id] = []
            loop.call_soon(self._flush, release_id)
        future: asyncio.Future[ClaimOutcome] = loop.create_future()
        pending.append((request, future))
        return future

    def _flush(self, release_id: str) -> None:
        pending = self._pending.pop(release_id)
        for start in range(0, len(pending), self._max_batch):
            chunk = pending[start:start + self._max_batch]
            task = asyncio.create_task(self._call(release_id, chunk))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _call(
        self, release_id: str, batch: list[tuple[ClaimRequest, asyncio.Future[ClaimOutcome]]]
    ) -> None:
        CLAIM_BATCH_SIZE.observe(len(batch))
        try:
            outcomes = await self._run(release_id, [request for request, _ in batch])
        except Exception as exc:  # every waiter gets the failure; none is left hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():  # the request may have been cancelled meanwhile
                future.set_result(outcome)

    async def drain(self) -> None:
        """Wait for script calls already sent: their claims are taken and must be answered."""
        while self._pending or self._in_flight:
            await asyncio.sleep(0)
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
