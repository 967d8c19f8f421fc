"""Booking codes are a keyed permutation of a sequence: consecutive claims must not get
related codes. Measured with chi-square and binomial bounds, on the permutation under
six secrets and on the codes real claims get from the claim script."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from support import release_definition, residents

from release_service.scripts.booking_codes import SPACE, code_for, code_keys, seq_for
from release_service.scripts.claim import ClaimRequest, ClaimScript

N = 20_000
# Chi-square with 9 degrees of freedom: exceeded with probability 0.001 when uniform.
CHI2_9_P001 = 27.88
# Bounds for a secret drawn afresh each run, where a test must not fail by chance: chi-square
# exceeded with probability 1e-7, and 5.5 standard deviations (4e-8).
CHI2_9_P1E7, Z_4E8 = 50.0, 5.5


def chi_square(values: list[int]) -> float:
    counts, expected = Counter(values), len(values) / 10
    return sum((counts.get(d, 0) - expected) ** 2 / expected for d in range(10))


def digits(number: int) -> str:
    return f"{number:08d}"


def test_codes_are_a_permutation_with_an_inverse():
    keys = code_keys("a secret for this test")
    codes = [code_for(seq, keys) for seq in range(N)]
    assert len(set(codes)) == N and all(len(c) == 8 and c.isdigit() for c in codes)
    assert [seq_for(c, keys) for c in codes[:2000]] == list(range(2000))
    assert code_for(SPACE - 1, keys) != code_for(SPACE - 2, keys)


SECRETS = [f"code secret {i}" for i in range(6)]
# The same bound for the sum over the six secrets (54 degrees of freedom): a weakness too
# small to show for one secret adds up.
CHI2_54_P001 = 91.9


def unrelated_neighbours(codes: list[int], chi_bound: float = CHI2_9_P001,
                         z_bound: float = 4.0) -> list[float]:
    """Assert that each code tells nothing about the next; return the chi-square of each
    digit of the differences (for a bound over several runs). The default bounds suit fixed
    secrets, whose outcome never changes; a fresh secret needs the wider ones."""
    pairs = list(itertools.pairwise(codes))
    differences = [digits((b - a) % SPACE) for a, b in pairs]
    chis = []
    for position in range(8):  # every digit of the difference is uniform
        chi = chi_square([int(d[position]) for d in differences])
        assert chi < chi_bound, (position, chi)
        chis.append(chi)
    for position in range(8):  # a digit repeats in the next code one time in ten
        same = sum(digits(a)[position] == digits(b)[position] for a, b in pairs)
        expected, sd = len(pairs) / 10, (len(pairs) * 0.1 * 0.9) ** 0.5
        assert abs(same - expected) < z_bound * sd, (position, same)
    # Shared 3-digit prefixes: about one pair in a thousand (Poisson, mean ~20 for N).
    assert sum(digits(a)[:3] == digits(b)[:3] for a, b in pairs) < 45
    # Codes close in value (|difference| < 10^5): 0.2% by chance.
    close = sum(min((b - a) % SPACE, (a - b) % SPACE) < 100_000 for a, b in pairs)
    assert close < 0.004 * len(pairs) + 10
    return chis


def test_consecutive_codes_are_unrelated():
    totals = [0.0] * 8
    for secret in SECRETS:
        keys = code_keys(secret)
        chis = unrelated_neighbours([int(code_for(seq, keys)) for seq in range(N)])
        totals = [t + c for t, c in zip(totals, chis, strict=True)]
    assert max(totals) < CHI2_54_P001, totals


async def test_consecutive_codes_of_real_claims_are_unrelated(api, redis, stack_settings):
    """The codes the claim script hands out, in the order it hands them out: the Python
    permutation of consecutive sequence numbers under the stack's secret (drawn afresh
    each run, hence the wide bounds; a 4-sigma bound failed once in CI by chance)."""
    release_id = (await api.create_release(release_definition([N])))["release_id"]
    script = ClaimScript(redis, stack_settings.code_secret)
    codes: list[int] = []
    for start in range(0, N, 500):
        outcomes = await script(release_id, [
            ClaimRequest(claim_id=f"c{i}", account_id=f"a{i}", person_id=f"p{i}", slot_id="",
                         idempotency_key="", birth=19950101, sex="F")
            for i in range(start, start + 500)])
        assert {o.status for o in outcomes} == {"ok"}
        codes += [int(o.claim["code"]) for o in outcomes if o.claim]
    assert len(set(codes)) == N
    keys = code_keys(stack_settings.code_secret)
    first = seq_for(f"{codes[0]:08d}", keys)
    assert codes == [int(code_for(seq, keys)) for seq in range(first, first + N)]
    unrelated_neighbours(codes, CHI2_9_P1E7, Z_4E8)


async def test_the_claim_script_gives_the_same_permutation(api, stack_settings):
    release = await api.create_release(release_definition([300]))
    people = residents(stack_settings, 300)
    codes = []
    for chunk in range(0, 300, 50):  # in order, so the sequence numbers follow each other
        answers = await asyncio.gather(*(api.claim(release["release_id"], p)
                                         for p in people[chunk:chunk + 50]))
        batch = sorted((body["claimed_at"], body["code"]) for status, _, body in answers
                       if status == 201)
        codes += [code for _, code in batch]
    assert len(set(codes)) == 300
    keys = code_keys(stack_settings.code_secret)
    seqs = sorted(seq_for(code, keys) for code in codes)
    assert seqs == list(range(seqs[0], seqs[0] + 300))  # one block, consecutive
    assert {code_for(s, keys) for s in seqs} == set(codes)
