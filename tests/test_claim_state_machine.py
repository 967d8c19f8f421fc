"""The claim and cancel scripts against a model, on real Redis: Hypothesis drives random
sequences (batches of claims for a slot or any slot, cancels by the owner and by others,
replays by idempotency key) and the model says what each answer must be."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.asyncio import Redis
from support import release_definition

from release_service import keys
from release_service.cancel_script import CancelScript
from release_service.claim_script import ClaimRequest, ClaimScript
from release_service.release_definition import parse_definition
from release_service.releases import preheat
from release_service.settings import Settings

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


def run_machine(stack_settings: Settings) -> None:
    """Runs the machine with its own event loop and Redis client (Hypothesis is sync)."""

    class ClaimCancel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.redis = Redis.from_url(stack_settings.redis_url)
            self.claims = ClaimScript(self.redis, stack_settings.code_secret)
            self.cancels = CancelScript(self.redis)
            definition = parse_definition(release_definition(
                [CAPACITY[s] for s in sorted(CAPACITY)], release_id=f"sm-{next(_ids)}-"
                f"{secrets.token_hex(3)}"))
            assert definition.release_id is not None
            self.release_id = definition.release_id
            self.run(preheat(self.redis, definition, stack_settings.zone,
                             code_first=next(_ids) * 1000, code_size=1000, state="scheduled"))
            self.held: dict[str, Held] = {}  # person -> active claim
            self.cancelled: list[Held] = []
            self.by_key: dict[tuple[str, str], Held] = {}  # (account, key) -> first claim
            self.codes: set[str] = set()

        def run(self, coroutine):  # type: ignore[no-untyped-def]
            return self.loop.run_until_complete(coroutine)

        def teardown(self) -> None:
            self.run(self.redis.aclose())
            self.loop.close()

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
                assert outcome.status == "not_found", outcome  # another account's claim
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

    ClaimCancel.TestCase.settings = settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    ClaimCancel.TestCase().runTest()


def test_claims_and_cancels_match_the_model(stack_settings):
    run_machine(stack_settings)
