"""Per-person booking limits: the platform's defaults, which a release may override."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BookingLimits:
    """Per-person booking limits (-1: none). Defaults are the hospital platform's."""

    same_day_clinic: int = 1
    per_day: int = 2
    per_7_days: int = 3
    per_3_months: int = 5
