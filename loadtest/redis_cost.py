"""Redis CPU per claim: our scripts against the issue's reference script, in one run.

    .venv/bin/python loadtest/redis_cost.py [--claims 16000] [--batch 16] [--rounds 3]

Starts its own redis-server (loopback, a free port, AOF with appendfsync everysec as the
stack runs it) and makes the same number of winning claims, in script calls of `--batch`
claims each, three ways, round after round:

- reference      the issue's short claim script (loadtest/reference_server.py): a stock
                 counter and a holders set, nothing else;
- claim          lua/claim.lua as the gateway calls it: any slot on the visit day, both
                 claim rate counters, booking code, outbox event;
- claim+reserve  lua/person_reserve.lua (the person's limits and bans) and then the claim,
                 as every winning claim costs Redis.

Redis's own CPU (INFO used_cpu_user + used_cpu_sys) over the claims made is the figure;
the median of the rounds is printed, with the ratio to `reference` and the script time
Redis counts for EVALSHA (INFO commandstats). The gateway's share of Redis at its peak is
its claims per second times this figure (`bench.py` reports both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone

from bench import free_port
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from reference_server import CLAIM_SCRIPT, STOCK_KEY
from tqdm import tqdm

from release_service.core import keys
from release_service.devtools.stack import redis_binary
from release_service.people.limits import BookingLimits
from release_service.releases.definition import parse_definition
from release_service.releases.store import preheat
from release_service.scripts.claim import ClaimLimit, ClaimRequest, ClaimScript
from release_service.scripts.reserve import Reservation, ReserveScript

CLINIC_ZONE = timezone(timedelta(hours=8))
SCENARIOS = ("reference", "claim", "claim+reserve")


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Scenarios:
    def __init__(self, redis: Redis, claims: int, batch: int) -> None:
        self.redis, self.claims, self.batch = redis, claims, batch
        self.reference = redis.register_script(CLAIM_SCRIPT)
        self.claim = ClaimScript(redis, "redis-cost-" + "x" * 32)
        self.persons = ReserveScript(redis)
        self.made = 0  # persons and accounts are new in every call

    async def measure(self, name: str) -> tuple[float, float]:
        """(Redis CPU µs per claim, EVALSHA µs per claim) of one scenario's claims."""
        call = await self._prepare(name)
        await self.redis.config_resetstat()
        before = await redis_cpu(self.redis)
        for _ in range(self.claims // self.batch):
            await call()
        cpu = await redis_cpu(self.redis) - before
        stats = await self.redis.info("commandstats")
        script_us = stats.get("cmdstat_evalsha", {}).get("usec", 0)
        return 1e6 * cpu / self.claims, script_us / self.claims

    async def _prepare(self, name: str) -> Callable[[], Awaitable[None]]:
        if name == "reference":
            holders = f"reference:{{bench}}:holders:{self.made}"
            await self.redis.set(STOCK_KEY, 10**9)

            async def reference() -> None:
                persons = [f"p{self._next()}" for _ in range(self.batch)]
                won = await self.reference(keys=[STOCK_KEY, holders], args=persons)
                assert all(won)
            return reference

        release_id, day = await self._release()

        async def claim() -> None:
            requests = [self._request(release_id, day) for _ in range(self.batch)]
            if name == "claim+reserve":
                reserved = await self.persons.reserve("", [Reservation(
                    r.claim_id, r.person_id, release_id, day, "c", "v", BookingLimits())
                    for r in requests])
                assert all(r.status == "ok" for r in reserved)
            outcomes = await self.claim(release_id, requests)
            assert all(o.status == "ok" for o in outcomes), outcomes[0]
        return claim

    def _next(self) -> int:
        self.made += 1
        return self.made

    def _request(self, release_id: str, day: str) -> ClaimRequest:
        n = self._next()
        return ClaimRequest(
            claim_id=os.urandom(12).hex(), account_id=f"a{n}", person_id=f"p{n}", slot_id="",
            idempotency_key="", birth=19950101, sex="F", day=day, request_id="r" * 16,
            limits=(ClaimLimit(keys.claim_rate_key(release_id, "account", f"a{n}"), 5,
                               60_000, "claims per account"),
                    ClaimLimit(keys.claim_rate_key(release_id, "address", "127.0.0.1"),
                               10**9, 60_000, "claims per address")))

    async def _release(self) -> tuple[str, str]:
        """A first-come release open now with stock for every claim, four slots in a day."""
        now = datetime.now(UTC)
        start = (now + timedelta(days=7)).replace(hour=2, minute=0, second=0, microsecond=0)
        release_id = f"cost-{self._next()}"
        definition = parse_definition({
            "release_id": release_id, "vaccine": "HPV9", "dose": 1, "clinic_id": "c",
            "department": "v", "opens_at": (now - timedelta(seconds=5)).isoformat(),
            "closes_at": (now + timedelta(hours=1)).isoformat(),
            "slots": [{"slot_id": f"s{i}",
                       "starts_at": (start + timedelta(hours=i)).isoformat(),
                       "ends_at": (start + timedelta(hours=i + 1)).isoformat(),
                       "capacity": self.claims} for i in range(4)]})
        await preheat(self.redis, definition, CLINIC_ZONE, 1_000, 5 * self.claims)
        return release_id, start.astimezone(CLINIC_ZONE).strftime("%Y%m%d")


async def run(args: argparse.Namespace, port: int) -> None:
    redis = Redis(port=port)
    try:
        for _ in range(100):  # until it listens
            try:
                await redis.ping()
                break
            except RedisConnectionError:
                await asyncio.sleep(0.05)
        scenarios = Scenarios(redis, args.claims, args.batch)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in SCENARIOS}
        with tqdm(total=args.rounds * len(SCENARIOS), desc="redis cost", unit="run") as bar:
            for _ in range(args.rounds):
                for name in SCENARIOS:
                    figures[name].append(await scenarios.measure(name))
                    bar.update()
    finally:
        await redis.aclose()
    base = statistics.median(cpu for cpu, _ in figures["reference"])
    print(f"\n{args.claims:,} claims per run, {args.batch} per script call, "
          f"median of {args.rounds} rounds\n")
    print("| scenario | Redis CPU µs/claim | x reference | EVALSHA µs/claim |")
    print("| --- | ---: | ---: | ---: |")
    for name in SCENARIOS:
        cpu = statistics.median(c for c, _ in figures[name])
        script = statistics.median(s for _, s in figures[name])
        print(f"| {name} | {cpu:.1f} | {cpu / base:.1f} | {script:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=16_000, help="claims per run")
    parser.add_argument("--batch", type=int, default=16, help="claims per script call")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every scenario (the median is reported)")
    args = parser.parse_args()
    folder, port = tempfile.mkdtemp(prefix="redis-cost-"), free_port()
    server = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--dir", folder],
        stdout=subprocess.DEVNULL)
    try:
        asyncio.run(run(args, port))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
