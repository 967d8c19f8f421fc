"""Times as the API and the messages show them."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any


def iso(ms: int, zone: Any) -> str:
    """`ms` (Unix milliseconds) as ISO 8601 in `zone`, e.g. 2026-12-01T09:00:00.123+08:00.
    Every 201 carries one, and a spike's claims share a few seconds: the date, time and
    offset of a second are formatted once (a third of the cost)."""
    second, milli = divmod(ms, 1000)
    before, after = _second_text(second, zone)
    return f"{before}.{milli:03d}{after}"


@functools.lru_cache(maxsize=64)
def _second_text(second: int, zone: Any) -> tuple[str, str]:
    text = datetime.fromtimestamp(second, tz=zone).isoformat()
    return text[:19], text[19:]  # YYYY-MM-DDTHH:MM:SS, then the offset
