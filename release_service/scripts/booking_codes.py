"""Booking codes: the same keyed permutation of [0, 10^8) as `lua/claim.lua`, in Python,
with its inverse, so a code leads back to its sequence number and hence its release."""

from __future__ import annotations

import hashlib

SPACE = 100_000_000
HALF = 10_000


def code_keys(code_secret: str) -> list[int]:
    """Four permutation keys below 10^6 derived from the code secret."""
    return [
        int.from_bytes(hashlib.sha256(f"{i}:{code_secret}".encode()).digest()[:8], "big")
        % 1_000_000
        for i in range(4)
    ]


def _round_keys(keys: list[int]) -> list[int]:
    k1, k2, k3, k4 = keys
    return [k1, k2, k3, k4, k1 + k3, k2 + k4]


def _f(half: int, key: int, rnd: int) -> int:
    # A keyed hash, as in claim.lua (Redis scripts offer SHA-1). The arithmetic round
    # function before it left the last digit of consecutive codes' differences skewed
    # (chi-square twice its expectation over a dozen secrets).
    digest = hashlib.sha1(f"{key}:{rnd}:{half}".encode(), usedforsecurity=False).hexdigest()
    return int(digest[:8], 16) % HALF


def code_for(seq: int, keys: list[int]) -> str:
    hi, lo = divmod(seq, HALF)
    for rnd, key in enumerate(_round_keys(keys), start=1):
        hi, lo = lo, (hi + _f(lo, key, rnd)) % HALF
    return f"{hi * HALF + lo:08d}"


def seq_for(code: str, keys: list[int]) -> int:
    hi, lo = divmod(int(code), HALF)
    for rnd, key in reversed(list(enumerate(_round_keys(keys), start=1))):
        hi, lo = (lo - _f(hi, key, rnd)) % HALF, hi
    return hi * HALF + lo


def is_code(text: str) -> bool:
    return len(text) == 8 and text.isdigit()
