"""The claim and cancel scripts against a model, on real Redis: Hypothesis drives random
sequences and the model says what each answer must be.

- `ClaimCancel`: one release; batches of claims for a slot or any slot, cancels by the
  owner and by others, replays by idempotency key.
- `LimitsAcrossReleases`: the gateway's whole claim path over five releases on three days
  in three clinics: reserve on the person's slot (bans, per-person limits), claim in the
  release, give the reservation back when refused; cancel gives both back.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.asyncio import Redis
from support import release_definition

from release_service.core import keys
from release_service.core.settings import Settings
from release_service.people.limits import BookingLimits
from release_service.releases.definition import parse_definition
from release_service.releases.store import preheat
from release_service.scripts.cancel import CancelScript
from release_service.scripts.claim import ClaimRequest, ClaimScript
from release_service.scripts.reserve import Reservation, ReserveScript

CAPACITY = {"s0": 2, "s1": 1, "s2": 3}
PERSONS = [f"p{i}" for i in range(9)]
ACCOUNT = {p: f"a{i % 3}" for i, p in enumerate(PERSONS)}  # three persons per account
_ids = itertools.count()


@dataclass
class Held:
    claim_id: str
    account_id: str
    slot_id: str
    code: str


class OnRedis(RuleBasedStateMachine):
    """A machine with its own event loop and Redis client (Hypothesis is sync)."""

    stack: Settings  # given by run()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = Redis.from_url(self.stack.redis_url)

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.loop.close()

    def preheat(self, definition: dict) -> str:  # type: ignore[type-arg]
        parsed = parse_definition(definition)
        assert parsed.release_id is not None
        self.run(preheat(self.redis, parsed, self.stack.zone, code_first=next(_ids) * 1000,
                         code_size=1000, state="scheduled"))
        return parsed.release_id


def run(machine: type[OnRedis], stack_settings: Settings, examples: int, steps: int,
        shrink: bool = True) -> None:
    bound = type(machine.__name__, (machine,), {"stack": stack_settings})
    phases = tuple(p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain))
    bound.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, phases=phases,
        suppress_health_check=[HealthCheck.too_slow])
    bound.TestCase().runTest()


class ClaimCancel(OnRedis):
    def __init__(self) -> None:
        super().__init__()
        self.claims = ClaimScript(self.redis, self.stack.code_secret)
        self.cancels = CancelScript(self.redis)
        self.release_id = self.preheat(release_definition(
            [CAPACITY[s] for s in sorted(CAPACITY)],
            release_id=f"sm-{next(_ids)}-{secrets.token_hex(3)}"))
        self.held: dict[str, Held] = {}  # person -> active claim
        self.cancelled: list[Held] = []
        self.by_key: dict[tuple[str, str], Held] = {}  # (account, key) -> first claim
        self.codes: set[str] = set()

    def taken(self, slot: str) -> int:
        return sum(h.slot_id == slot for h in self.held.values())

    @rule(batch=st.lists(st.tuples(st.sampled_from(PERSONS),
                                   st.sampled_from(["", *sorted(CAPACITY)]),
                                   st.sampled_from(["", "k1", "k2"])),
                         min_size=1, max_size=6))
    def claim_batch(self, batch: list[tuple[str, str, str]]) -> None:
        requests = [ClaimRequest(claim_id=secrets.token_hex(8), account_id=ACCOUNT[p],
                                 person_id=p, slot_id=slot, idempotency_key=key,
                                 birth=19950101, sex="F") for p, slot, key in batch]
        outcomes = self.run(self.claims(self.release_id, requests))
        for request, outcome in zip(requests, outcomes, strict=True):
            person, slot, key = request.person_id, request.slot_id, request.idempotency_key
            earlier = self.by_key.get((request.account_id, key)) if key else None
            if earlier is not None:
                assert outcome.status == "replay", outcome
                assert outcome.claim is not None
                assert outcome.claim["claim_id"] == earlier.claim_id
            elif person in self.held:
                assert outcome.status == "already_claimed", outcome
            elif (slot and self.taken(slot) < CAPACITY[slot]) or (
                    not slot and any(self.taken(s) < c for s, c in CAPACITY.items())):
                assert outcome.status == "ok", outcome
                assert outcome.claim is not None
                got = outcome.claim["slot_id"]
                assert (got == slot if slot else self.taken(got) < CAPACITY[got])
                held = Held(request.claim_id, request.account_id, got, outcome.claim["code"])
                assert held.code not in self.codes  # a code is never given twice
                self.codes.add(held.code)
                self.held[person] = held
                if key:
                    self.by_key[(request.account_id, key)] = held
            else:
                assert outcome.status == "sold_out", outcome

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), by_owner=st.booleans())
    def cancel(self, data: st.DataObject, by_owner: bool) -> None:
        person = data.draw(st.sampled_from(sorted(self.held)))
        held = self.held[person]
        caller = held.account_id if by_owner else \
            next(a for a in sorted(set(ACCOUNT.values())) if a != held.account_id)
        outcome = self.run(self.cancels(self.release_id, held.claim_id, caller))
        if not by_owner:
            assert outcome.status == "booking_not_found", outcome  # another account's claim
            return
        assert outcome.status == "ok", outcome
        del self.held[person]
        self.cancelled.append(held)

    @precondition(lambda self: bool(self.cancelled))
    @rule(data=st.data())
    def cancel_again(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from(self.cancelled))
        outcome = self.run(self.cancels(self.release_id, held.claim_id, held.account_id))
        assert outcome.status == "already_cancelled", outcome

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        rid = self.release_id
        taken = self.run(self.redis.hgetall(keys.taken_key(rid)))
        holders = self.run(self.redis.hgetall(keys.holders_key(rid)))
        left = self.run(self.redis.hget(keys.meta_key(rid), "left"))
        for slot, capacity in CAPACITY.items():
            assert int(taken.get(slot.encode(), 0)) == self.taken(slot) <= capacity
        assert {p.decode(): c.decode() for p, c in holders.items()} == \
            {p: h.claim_id for p, h in self.held.items()}
        assert int(left) == sum(CAPACITY.values()) - len(self.held)


# Five releases (clinic, day offset, slot capacities, limits): R0 and R1 share a clinic
# and a day (same_day_clinic), R2 is another clinic that day with one booking a day
# (per_day), R3 has a tight three-month limit and no weekly one, R4 a third day and
# clinic (per_7_days).
RELEASES = [("c1", 0, [2, 1], BookingLimits()), ("c1", 0, [2], BookingLimits()),
            ("c2", 0, [3], BookingLimits(1, 1, 3, 5)),
            ("c2", 1, [2, 1], BookingLimits(1, 2, -1, 2)),
            ("c3", 2, [3], BookingLimits())]
DEPARTMENT = "vaccination"
LIMIT_NAMES = ("same_day_clinic", "per_day", "per_7_days", "per_3_months")
# The platform's limits, the loosest any release has: what a person can ever hold.
MOST_SAME_DAY_CLINIC, MOST_PER_DAY, MOST_ACTIVE = 1, 2, 3


@dataclass
class Booking:
    claim_id: str
    release: int
    slot_id: str

    @property
    def day(self) -> int:
        return RELEASES[self.release][1]

    @property
    def clinic(self) -> str:
        return RELEASES[self.release][0]


def model_reservation(active: list[Booking], release: int) -> tuple[str, str]:
    """What person_reserve.lua must answer for a person holding `active`."""
    if any(b.release == release for b in active):
        return "already_claimed", ""
    clinic, day, _, limits = RELEASES[release]
    same_day = [b for b in active if b.day == day]
    counts = (1 + sum(b.clinic == clinic for b in same_day), 1 + len(same_day),
              1 + len(active), 1 + len(active))  # every booking here is from this week
    for name, count in zip(LIMIT_NAMES, counts, strict=True):
        limit = getattr(limits, name)
        if 0 <= limit < count:
            return "limit_reached", name
    return "ok", ""


class LimitsAcrossReleases(OnRedis):
    def __init__(self) -> None:
        super().__init__()
        self.claims = ClaimScript(self.redis, self.stack.code_secret)
        self.cancels = CancelScript(self.redis)
        self.persons_script = ReserveScript(self.redis)
        # Persons are keyed across releases: new ones for every example.
        tag = secrets.token_hex(3)
        self.persons = [f"lim-{tag}-p{i}" for i in range(4)]
        first_day = (datetime.now(UTC) + timedelta(days=10)).replace(
            hour=2, minute=0, second=0, microsecond=0)  # 10:00 in the clinic's zone
        self.release_ids: list[str] = []
        self.days: list[str] = []
        for clinic, offset, capacities, _ in RELEASES:
            start = first_day + timedelta(days=offset)
            slots = [{"slot_id": f"s{i}", "starts_at": (start + timedelta(hours=i)).isoformat(),
                      "ends_at": (start + timedelta(hours=i + 1)).isoformat(),
                      "capacity": capacity} for i, capacity in enumerate(capacities)]
            self.release_ids.append(self.preheat(release_definition(
                [], release_id=f"lim-{next(_ids)}-{tag}", clinic_id=clinic,
                department=DEPARTMENT, slots=slots)))
            self.days.append(start.astimezone(self.stack.zone).strftime("%Y%m%d"))
        self.active: dict[str, list[Booking]] = {p: [] for p in self.persons}

    def taken(self, release: int, slot: str) -> int:
        return sum(b.release == release and b.slot_id == slot
                   for held in self.active.values() for b in held)

    @rule(person=st.integers(0, 3), release=st.integers(0, len(RELEASES) - 1),
          slot=st.sampled_from(["", "s0", "s1"]))
    def claim(self, person: int, release: int, slot: str) -> None:
        """As the gateway does: reserve, claim, give the reservation back if refused."""
        capacities = RELEASES[release][2]
        if slot and int(slot[1:]) >= len(capacities):
            slot = ""  # a release with one slot: any slot
        person_id, rid, day = self.persons[person], self.release_ids[release], self.days[release]
        clinic, _, _, limits = RELEASES[release]
        claim_id = secrets.token_hex(8)
        reserved, = self.run(self.persons_script.reserve("", [Reservation(
            claim_id, person_id, rid, day, clinic, DEPARTMENT, limits)]))
        expected = model_reservation(self.active[person_id], release)
        assert (reserved.status, reserved.detail) == expected, (reserved, expected)
        if reserved.status == "already_claimed":  # it names the reservation it found
            assert reserved.held in {b.claim_id for b in self.active[person_id]}, reserved
        if reserved.status != "ok":
            return
        outcome, = self.run(self.claims(rid, [ClaimRequest(
            claim_id=claim_id, account_id=f"acct-{person_id}", person_id=person_id,
            slot_id=slot, idempotency_key="", birth=19950101, sex="F",
            day="" if slot else day)]))
        free = [f"s{i}" for i, c in enumerate(capacities) if self.taken(release, f"s{i}") < c]
        if slot in free or (not slot and free):
            assert outcome.status == "ok", outcome
            assert outcome.claim is not None and outcome.claim["slot_id"] in free
            self.active[person_id].append(Booking(claim_id, release, outcome.claim["slot_id"]))
        else:
            assert outcome.status == "sold_out", outcome
            self.run(self.persons_script.unreserve([(person_id, claim_id)]))

    @precondition(lambda self: any(self.active.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        person_id = data.draw(st.sampled_from(sorted(p for p, a in self.active.items() if a)))
        booking = data.draw(st.sampled_from(self.active[person_id]))
        outcome = self.run(self.cancels(self.release_ids[booking.release], booking.claim_id,
                                        f"acct-{person_id}"))
        assert outcome.status == "ok", outcome
        self.run(self.persons_script.unreserve([(person_id, booking.claim_id)]))
        self.active[person_id].remove(booking)

    @invariant()
    def no_person_past_a_limit(self) -> None:
        for bookings in self.active.values():
            assert len(bookings) <= MOST_ACTIVE
            assert max(Counter(b.day for b in bookings).values(), default=0) <= MOST_PER_DAY
            assert max(Counter((b.day, b.clinic) for b in bookings).values(),
                       default=0) <= MOST_SAME_DAY_CLINIC

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        for release, rid in enumerate(self.release_ids):
            capacities = RELEASES[release][2]
            taken = self.run(self.redis.hgetall(keys.taken_key(rid)))
            left = int(self.run(self.redis.hget(keys.meta_key(rid), "left")))
            claimed = 0
            for i, capacity in enumerate(capacities):
                count = int(taken.get(f"s{i}".encode(), 0))
                assert 0 <= count == self.taken(release, f"s{i}") <= capacity
                claimed += count
            assert left >= 0 and claimed + left == sum(capacities)
        for person_id, bookings in self.active.items():
            reserved = self.run(self.redis.hkeys(keys.person_active_key(person_id)))
            assert sorted(c.decode() for c in reserved) == sorted(b.claim_id for b in bookings)


def test_claims_and_cancels_match_the_model(stack_settings):
    run(ClaimCancel, stack_settings, examples=40, steps=25)


def test_limits_across_releases_match_the_model(stack_settings):
    # Shrinking replays hundreds of sequences over five releases: minutes, past the test
    # timeout. A failure prints its sequence of at most 25 steps unshrunk.
    run(LimitsAcrossReleases, stack_settings, examples=25, steps=25, shrink=False)
