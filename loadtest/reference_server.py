"""The issue's two reference designs, to calibrate our claim path on the same machine.

    python loadtest/reference_server.py PORT single|batch REDIS_URL [PROCESSES]

Both are the minimal handler (minimal_server.py) plus one short claim script in Redis:
take one unit of a stock counter if any is left, add the person to the holders, reply a
pre-encoded body. No token, no limits, no idempotency, no outbox: the floor of a claim
that goes through Redis.

- single: one redis-py EVALSHA per request.
- batch:  the requests of one event-loop tick (up to 32) share one EVALSHA.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial

import orjson
from aiohttp import web
from minimal_server import BODY, serve_processes
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

STOCK_KEY, HOLDERS_KEY = "reference:{bench}:stock", "reference:{bench}:holders"
STOCK = 10**9
MAX_BATCH = 32
SOLD_OUT = orjson.dumps({"code": "sold_out", "status": 409})

# KEYS: stock, holders. ARGV: the persons. Reply: 1 (won) or 0 (sold out) per person.
CLAIM_SCRIPT = """
local left = tonumber(redis.call('GET', KEYS[1]) or '0')
local won = {}
for i = 1, #ARGV do
  if left > 0 then
    left = left - 1
    redis.call('SADD', KEYS[2], ARGV[i])
    won[i] = 1
  else
    won[i] = 0
  end
end
redis.call('SET', KEYS[1], left)
return won
"""


def answer(won: int) -> web.Response:
    if won:
        return web.Response(status=201, body=BODY, content_type="application/json")
    return web.Response(status=409, body=SOLD_OUT, content_type="application/json")


class Batches:
    """The persons that arrive in one event-loop tick, sent in one script call."""

    def __init__(self, claim: AsyncScript) -> None:
        self._claim = claim
        self._pending: list[tuple[str, asyncio.Future[int]]] = []
        self._calls: set[asyncio.Task[None]] = set()

    def submit(self, person: str) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((person, future))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            task = asyncio.create_task(self._call(pending[start:start + MAX_BATCH]))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[tuple[str, asyncio.Future[int]]]) -> None:
        try:
            won = await self._claim(keys=[STOCK_KEY, HOLDERS_KEY],
                                    args=[person for person, _ in batch])
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, won, strict=True):
            future.set_result(result)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def reference_app(mode: str, redis_url: str) -> web.Application:
    # No I/O here: redis-py connects on the first call, inside the server's event loop.
    redis = Redis.from_url(redis_url)
    claim = redis.register_script(CLAIM_SCRIPT)
    batches = Batches(claim)

    async def single(request: web.Request) -> web.Response:
        person = orjson.loads(await request.read())["person_id"]
        won = await claim(keys=[STOCK_KEY, HOLDERS_KEY], args=[person])
        return answer(won[0])

    async def batched(request: web.Request) -> web.Response:
        person = orjson.loads(await request.read())["person_id"]
        return answer(await batches.submit(person))

    async def close(_app: web.Application) -> None:
        await redis.aclose()

    app = web.Application()
    app.on_cleanup.append(close)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", single if mode == "single" else batched)
    return app


if __name__ == "__main__":
    port, mode, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode not in ("single", "batch"):
        sys.exit("mode must be single or batch")
    serve_processes(partial(reference_app, mode, url), port,
                    int(sys.argv[4]) if len(sys.argv) > 4 else 1)
