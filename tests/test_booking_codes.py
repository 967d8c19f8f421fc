"""Booking codes are a keyed permutation of a sequence: consecutive claims must not get
related codes. Measured with chi-square and binomial bounds, for a fixed secret."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from support import release_definition, residents

from release_service.booking_codes import SPACE, code_for, code_keys, seq_for

N = 20_000
# Chi-square with 9 degrees of freedom: exceeded with probability 0.001 when uniform.
CHI2_9_P001 = 27.88


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


def consecutive_pairs(secret: str) -> list[tuple[int, int]]:
    keys = code_keys(secret)
    codes = [int(code_for(seq, keys)) for seq in range(N)]
    return list(itertools.pairwise(codes))


def test_consecutive_codes_are_unrelated():
    totals = [0.0] * 8
    for secret in SECRETS:
        pairs = consecutive_pairs(secret)
        differences = [digits((b - a) % SPACE) for a, b in pairs]
        for position in range(8):  # every digit of the difference is uniform
            chi = chi_square([int(d[position]) for d in differences])
            assert chi < CHI2_9_P001, (secret, position, chi)
            totals[position] += chi
        for position in range(8):  # a digit repeats in the next code one time in ten
            same = sum(digits(a)[position] == digits(b)[position] for a, b in pairs)
            expected, sd = len(pairs) / 10, (len(pairs) * 0.1 * 0.9) ** 0.5
            assert abs(same - expected) < 4 * sd, (secret, position, same)
        # Shared 3-digit prefixes: about one pair in a thousand (Poisson, mean ~20).
        assert sum(digits(a)[:3] == digits(b)[:3] for a, b in pairs) < 45
        # Codes close in value (|difference| < 10^5): 0.2% by chance.
        close = sum(min((b - a) % SPACE, (a - b) % SPACE) < 100_000 for a, b in pairs)
        assert close < 0.004 * len(pairs) + 10
    assert max(totals) < CHI2_54_P001, totals


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
