"""The lottery draw itself: a seeded Fisher–Yates shuffle anyone can repeat, from a seed
committed to before anyone could enter.

The seed is fixed when the release is created (`commit_seed`, in the same transaction as
the release's keys): Redis keeps a random nonce on the release's slot, and the seed is the
HMAC of release and nonce under the server's code secret (`seed_from`), so whoever can
read Redis but not the service's secrets cannot learn the seed early. From then on
GET /v1/releases/{id}/lottery publishes its SHA-256 (`seed_sha256`, of the seed's decimal
digits in ASCII), so the seed cannot be chosen after seeing the entries; the seed itself is
published with the result, with the number of entries and the algorithm (`DRAW_ALGORITHM`,
spelled out in `ALGORITHM_TEXT`). Entry numbers run from 1 in the order entries were
accepted. To verify a draw, with Python's standard library only:

    assert hashlib.sha256(seed_text.encode()).hexdigest() == seed_sha256  # seen before
    rng = random.Random(int(seed_text))      # MT19937 seeded with the integer seed
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

import hashlib
import hmac
import random
import secrets
from typing import Any

from ..core import keys

DRAW_ALGORITHM = "fisher-yates/mt19937-getrandbits64-mod/v1"
ALGORITHM_TEXT = (
    "seed_sha256 = SHA-256 hex of the seed's decimal digits (ASCII). "
    "rng = Python random.Random(int(seed)); order = [1, 2, ..., entries]; "
    "for i from entries-1 down to 1: j = rng.getrandbits(64) % (i+1), swap order[i] and "
    "order[j] (0-based). Winners are taken from the front of order, one per unit of "
    "stock, passing over the entries listed in skipped: the first len(winners) + "
    "len(skipped) entries of order are exactly the winners (in order) and the skipped.")


def new_seed() -> int:
    """128 bits from the operating system's generator: too many to guess from the hash."""
    return secrets.randbits(128)


def seed_commitment(seed: int | str) -> str:
    """The published SHA-256 of a seed, hex."""
    return hashlib.sha256(str(seed).encode("ascii")).hexdigest()


def commit_seed(pipe: Any, release_id: str, now_ms: int) -> None:
    """Queue the making of the release's seed (its nonce) on a (transactional) pipeline;
    nothing changes when the release has one: a seed, once committed to, is never
    replaced."""
    key = keys.lottery_seed_key(release_id)
    pipe.hsetnx(key, "nonce", str(new_seed()))
    pipe.hsetnx(key, "committed_at_ms", now_ms)


def seed_from(secret: str, release_id: str, committed: dict[str, str]) -> int:
    """The release's seed from its committed fields: 128 bits of the HMAC of release and
    nonce (a release committed to before nonces keeps its stored seed)."""
    if "seed" in committed:
        return int(committed["seed"])
    message = f"lottery-seed:{release_id}:{committed['nonce']}".encode()
    return int.from_bytes(hmac.new(secret.encode(), message, hashlib.sha256).digest()[:16],
                          "big")


def draw_order(entries: int, seed: int) -> list[int]:
    """Entry numbers 1..entries in drawn order (see the module's documentation)."""
    rng = random.Random(seed)
    bits = rng.getrandbits
    order = list(range(1, entries + 1))
    for i in range(entries - 1, 0, -1):
        j = bits(64) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order
