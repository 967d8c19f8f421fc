"""Lottery releases: entries during the window, one draw at the draw time (`closes_at`).

Entries are taken by `lua/lottery_enter.lua`. The draw runs in one process at a time (a
lock under the release's hash tag), shuffles with the seed committed to when the release
was created (`lottery_draw.py`), books winners through claim.lua (mode "draw": the same
atomic claim, outbox event, booking row and SMS as any claim) and tells everybody else by
SMS through the outbox (`lottery.lost` events, built in Redis by `lua/lottery_notify.lua`;
both scripts through their wrappers in scripts/lottery.py). A draw that dies half-way is
run again by the next caller with the committed seed and the recorded progress, so the
same order and the same winners: claims are keyed by entry, a winner already booked is
found booked, and a repeated loser event is one SMS (the consumer keeps one message per
event id and kind).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter
from redis.exceptions import RedisError

from ..core import keys
from ..core.aio import wait_event
from ..releases.catalog import ReleaseCatalog, ReleaseView
from ..scripts.claim import ClaimRequest, ClaimScript
from ..scripts.client import AnyRedis, reply_hash, reply_text
from ..scripts.lottery import EnterOutcome, Entrant, LotteryScripts
from ..scripts.reserve import Reservation, ReserveScript
from .lottery_draw import (
    ALGORITHM_TEXT,
    DRAW_ALGORITHM,
    commit_seed,
    draw_order,
    seed_commitment,
    seed_from,
)

log = logging.getLogger(__name__)

LOCK_MS = 120_000  # far above a 1,000,000-entry draw; renewed per chunk of winners
CHUNK = 500  # winners claimed per script call
NOTICE_BATCH = 2000  # loser events per script call: a few milliseconds of Redis each
READ_BATCH = 100_000

LOTTERY_ENTRIES = Counter("release_lottery_entries_total", "Lottery entries accepted")
LOTTERY_DRAWS = Counter("release_lottery_draws_total", "Lottery draws completed")


@dataclass(frozen=True, slots=True)
class Entry:
    number: int  # from 1, in the order entries were accepted
    person_id: str
    account_id: str
    birth: int
    sex: str


def _entry(number: int, raw: bytes) -> Entry:
    person_id, account_id, birth, sex = raw.decode().split("|")
    return Entry(number, person_id, account_id, int(birth), sex)


def entry_claim_id(release_id: str, seed: int, number: int) -> str:
    """The claim id of an entry's booking: the same when a draw is run again."""
    return hashlib.blake2b(f"{release_id}|{seed}|{number}".encode(), digest_size=12).hexdigest()


class Lottery:
    def __init__(self, redis: AnyRedis, claims: ClaimScript, persons: ReserveScript,
                 catalog: ReleaseCatalog, code_secret: str) -> None:
        self._redis = redis
        self._secret = code_secret  # the seeds' key (lottery_draw.seed_from)
        self._scripts = LotteryScripts(redis)
        self._claims = claims
        self._persons = persons
        self._catalog = catalog

    async def enter(self, release_id: str, person_id: str, account_id: str, birth: int,
                    sex: str) -> EnterOutcome:
        outcome = await self._scripts.enter(release_id,
                                            Entrant(person_id, account_id, birth, sex))
        if outcome.status == "ok":
            LOTTERY_ENTRIES.inc()
        return outcome

    async def entry_number(self, release_id: str, person_id: str) -> int | None:
        number = await self._redis.hget(keys.lottery_people_key(release_id), person_id)
        return int(number) if number is not None else None

    async def result(self, release_id: str) -> dict[str, Any]:
        """The published result: state, entries, the seed's SHA-256 (from the release's
        creation on), and once drawn the seed and winners."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.lottery_result_key(release_id))
        pipe.hgetall(keys.lottery_seed_key(release_id))
        pipe.llen(keys.lottery_entries_key(release_id))
        result, committed, listed = await pipe.execute()
        stored = reply_hash(result)
        fixed = reply_hash(committed)
        body: dict[str, Any] = {"release_id": release_id,
                                "entries": int(stored.get("entries") or listed),
                                "state": stored.get("state", "open")}
        seed = seed_from(self._secret, release_id, fixed) if fixed else None
        if seed is not None:
            body.update({"seed_sha256": seed_commitment(seed),
                         "committed_at_ms": int(fixed["committed_at_ms"])})
        if stored.get("state") in ("notifying", "drawn"):  # winners final, SMS on their way
            body.update({
                "seed": str(seed), "algorithm": stored["algorithm"],
                "algorithm_text": ALGORITHM_TEXT,
                "drawn_at_ms": int(stored["drawn_at_ms"]),
                "winners": orjson.loads(stored["winners"]),
                "skipped": orjson.loads(stored["skipped"]),
            })
        return body

    async def draw(self, release_id: str) -> dict[str, Any] | None:
        """Draw unless drawn; None when another process holds the draw's lock."""
        lock = keys.lottery_lock_key(release_id)
        token = os.urandom(8).hex()
        if not await self._redis.set(lock, token, nx=True, px=LOCK_MS):
            return None
        try:
            await self._draw_locked(release_id, lock, token)
        finally:
            # Only our own lock: compare-and-delete would need a script; the lock's
            # time-out covers a lock taken over after ours expired.
            if reply_text(await self._redis.get(lock) or b"") == token:
                await self._redis.delete(lock)
        return await self.result(release_id)

    async def _draw_locked(self, release_id: str, lock: str, token: str) -> None:
        result_key = keys.lottery_result_key(release_id)
        entries_key = keys.lottery_entries_key(release_id)
        # The seed was committed to at the release's creation and never changes. Only a
        # release created before commitments gets its seed now (`committed_at_ms` says so).
        pipe = self._redis.pipeline(transaction=True)
        commit_seed(pipe, release_id, int(time.time() * 1000))
        await pipe.execute()
        # The entry count is recorded first, once: a draw run again after a crash repeats
        # the same draw.
        await self._redis.hsetnx(result_key, "entries", await self._redis.llen(entries_key))
        recorded = reply_hash(await self._redis.hgetall(result_key))
        if recorded.get("state") == "drawn":
            return
        await self._redis.hsetnx(result_key, "algorithm", DRAW_ALGORITHM)
        await self._redis.hsetnx(result_key, "state", "drawing")  # a run again keeps its own
        fixed = reply_hash(await self._redis.hgetall(keys.lottery_seed_key(release_id)))
        recorded_seed = seed_from(self._secret, release_id, fixed)
        count = int(recorded["entries"])
        started = time.perf_counter()
        raw: list[bytes] = []
        for start in range(0, count, READ_BATCH):
            raw += [v if isinstance(v, bytes) else v.encode() for v in await
                    self._redis.lrange(entries_key, start, min(count, start + READ_BATCH) - 1)]
        order = draw_order(count, recorded_seed)
        shuffled = time.perf_counter()
        winners, skipped = await self._book_winners(release_id, recorded_seed, order, raw,
                                                    lock, token)
        await self._redis.hset(result_key, mapping={
            "winners": orjson.dumps(winners), "skipped": orjson.dumps(skipped),
            "drawn_at_ms": int(time.time() * 1000), "state": "notifying"})
        booked = time.perf_counter()
        # Everybody else is told, a range of entries per script call.
        for first in range(int(recorded.get("notified") or 0) + 1, count + 1, NOTICE_BATCH):
            await self._scripts.notify(release_id, first, min(count, first + NOTICE_BATCH - 1))
        await self._redis.hset(result_key, "state", "drawn")
        LOTTERY_DRAWS.inc()
        log.info("lottery %s drawn: %d entries, %d winners; read and shuffled in %.2f s, "
                 "winners booked in %.2f s, the others' SMS queued in %.2f s", release_id,
                 count, len(winners), shuffled - started, booked - shuffled,
                 time.perf_counter() - booked)

    async def _book_winners(self, release_id: str, seed: int, order: list[int],
                            raw: list[bytes], lock: str, token: str
                            ) -> tuple[list[int], list[dict[str, Any]]]:
        """Book from the front of the order until the stock is gone. Progress is recorded
        per chunk, so a draw run again goes on where it stopped (the chunk in flight is
        repeated: its claims are found made)."""
        view = self._catalog.get(release_id)
        if view is None:
            raise LookupError(f"release {release_id} is not served")
        result_key = keys.lottery_result_key(release_id)
        progress = await self._redis.hmget(result_key, "cursor", "winners", "skipped")
        cursor = int(progress[0] or 0)
        winners: list[int] = orjson.loads(progress[1] or b"[]")
        skipped: list[dict[str, Any]] = orjson.loads(progress[2] or b"[]")
        while cursor < len(order):
            free = await self._free_slots(release_id, view)
            if not free:
                break
            chunk = [_entry(n, raw[n - 1]) for n in order[cursor:cursor + min(CHUNK, len(free))]]
            booked = await self._book(release_id, seed, view, chunk, free)
            done = 0
            for entry, outcome in booked:
                if outcome == "sold_out":
                    break  # stock moved under us: this entry and the rest, again
                done += 1
                if outcome == "ok":
                    winners.append(entry.number)
                else:
                    skipped.append({"entry": entry.number, "reason": outcome})
            cursor += done
            if reply_text(await self._redis.get(lock) or b"") != token:
                raise RuntimeError("the draw's lock was lost")
            await self._redis.pexpire(lock, LOCK_MS)
            await self._redis.hset(result_key, mapping={
                "cursor": cursor, "winners": orjson.dumps(winners),
                "skipped": orjson.dumps(skipped)})
        return winners, skipped

    async def _free_slots(self, release_id: str, view: ReleaseView) -> list[str]:
        """One slot id per unit of stock left, slots in the release's order."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.capacity_key(release_id))
        pipe.hgetall(keys.taken_key(release_id))
        capacity, taken = await pipe.execute()
        free: list[str] = []
        for slot in view.document["slots"]:
            sid = slot["slot_id"]
            left = int(capacity.get(sid.encode(), 0)) - int(taken.get(sid.encode(), 0))
            free += [sid] * max(0, left)
        return free

    async def _book(self, release_id: str, seed: int, view: ReleaseView, chunk: list[Entry],
                    free: list[str]) -> list[tuple[Entry, str]]:
        """Reserve limits, then claim, for a chunk of winners: (entry, outcome) each."""
        doc = view.document
        day_of = {s["slot_id"]: str(s["visit_day"]) for s in doc["slots"]}
        planned = [(entry, free[i], entry_claim_id(release_id, seed, entry.number))
                   for i, entry in enumerate(chunk)]
        # A draw run again finds its own reservations (same claim ids).
        pipe = self._redis.pipeline(transaction=False)
        for entry, _, claim_id in planned:
            pipe.hexists(keys.person_active_key(entry.person_id), claim_id)
        held = await pipe.execute()
        reserve = [Reservation(claim_id, entry.person_id, release_id, day_of[slot_id],
                               doc["clinic_id"], doc["department"], view.limits)
                   for (entry, slot_id, claim_id), h in zip(planned, held, strict=True)
                   if not h]
        reserved = iter(await self._persons.reserve("", reserve) if reserve else [])
        outcomes: dict[str, str] = {}
        for (_, _, claim_id), h in zip(planned, held, strict=True):
            outcomes[claim_id] = "ok" if h else next(reserved).status
        requests = [ClaimRequest(claim_id=claim_id, account_id=e.account_id,
                                 person_id=e.person_id, slot_id=slot_id, idempotency_key="",
                                 birth=e.birth, sex=e.sex, drawn=True)
                    for e, slot_id, claim_id in planned if outcomes[claim_id] == "ok"]
        claimed = await self._claims(release_id, requests) if requests else []
        for request, result in zip(requests, claimed, strict=True):
            own = result.claim is not None and result.claim["claim_id"] == request.claim_id
            outcomes[request.claim_id] = "ok" if own else result.status
        refused = [(e.person_id, claim_id) for e, _, claim_id in planned
                   if outcomes[claim_id] != "ok"]
        await self._persons.unreserve(refused)
        return [(e, outcomes[claim_id]) for e, _, claim_id in planned]


def is_lottery(view: ReleaseView) -> bool:
    return view.document.get("mode") == "lottery"


async def draw_when_due(lottery: Lottery, catalog: ReleaseCatalog, stopping: asyncio.Event,
                        interval_seconds: float = 1.0) -> None:
    """Run in every gateway until `stopping`: draw each lottery release whose draw time
    (`closes_at`) has come. The draw's lock lets one process draw; the others find it
    drawn. A draw cut short by the shutdown is finished by the next (recorded seed)."""
    drawn: set[str] = set()
    while not await wait_event(stopping, interval_seconds):
        now = catalog.now_ms()
        for release_id in catalog.release_ids():
            view = catalog.get(release_id)
            if view is None or release_id in drawn or not is_lottery(view) \
                    or now < view.closes_ms or view.state == "closed":
                continue
            try:
                result = await lottery.draw(release_id)
            except (RedisError, LookupError, RuntimeError) as exc:
                log.warning("lottery %s not drawn yet: %s", release_id, exc)
                continue
            if result is not None and result["state"] == "drawn":
                drawn.add(release_id)
