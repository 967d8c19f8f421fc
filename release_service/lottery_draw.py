"""The lottery draw itself: a seeded Fisher–Yates shuffle anyone can repeat.

Published with every result (GET /v1/releases/{id}/lottery): the seed, the number of
entries and the algorithm's name, `DRAW_ALGORITHM`. Entry numbers run from 1 in the order
entries were accepted. To verify a draw, with Python's standard library only:

    rng = random.Random(seed)                # MT19937 seeded with the integer seed
    order = list(range(1, entries + 1))
    for i in range(entries - 1, 0, -1):      # Fisher–Yates, last position first
        j = rng.getrandbits(64) % (i + 1)    # bias below (i + 1) / 2**64: none that matters
        order[i], order[j] = order[j], order[i]

`order` is the draw: winners are taken from its front, one per slot, skipping entries
whose person cannot be booked (a limit reached meanwhile), which the result lists.
`random.Random(int)` and `getrandbits` are stable across Python versions, unlike
`random.shuffle`, whose use of the generator is not a documented contract.
"""

from __future__ import annotations

import random
import secrets

DRAW_ALGORITHM = "fisher-yates/mt19937-getrandbits64-mod/v1"


def new_seed() -> int:
    """128 bits from the operating system's generator: recorded before the draw runs."""
    return secrets.randbits(128)


def draw_order(entries: int, seed: int) -> list[int]:
    """Entry numbers 1..entries in drawn order (see the module's documentation)."""
    rng = random.Random(seed)
    bits = rng.getrandbits
    order = list(range(1, entries + 1))
    for i in range(entries - 1, 0, -1):
        j = bits(64) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order
