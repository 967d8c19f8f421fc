"""The release definition an admin posts: parsed and validated, with clear messages."""

from __future__ import annotations

import math
import secrets
from datetime import datetime, timedelta
from datetime import time as dt_time
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from ..core.errors import InvalidInput

# Ids end up inside Redis hash tags and comma-separated lists: keep them to a safe alphabet.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]

MAX_SLOTS = 500
MAX_CAPACITY = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class SlotDefinition(_Strict):
    slot_id: Identifier
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    capacity: int = Field(ge=0, le=MAX_CAPACITY, strict=True)

    @model_validator(mode="after")
    def _ends_after_start(self) -> SlotDefinition:
        if self.ends_at <= self.starts_at:
            raise ValueError(f"slot {self.slot_id}: ends_at must be after starts_at")
        return self


class Wave(_Strict):
    opens_at: AwareDatetime
    share: float = Field(gt=0, le=1)


class Eligibility(_Strict):
    min_age: int | None = Field(default=None, ge=0, le=150, strict=True)
    max_age: int | None = Field(default=None, ge=0, le=150, strict=True)
    sex: Literal["F", "M"] | None = None

    @model_validator(mode="after")
    def _range(self) -> Eligibility:
        if self.min_age is not None and self.max_age is not None and self.min_age > self.max_age:
            raise ValueError("eligibility: min_age must not exceed max_age")
        return self


class Cancellation(_Strict):
    """Free cancellation until `hours_before` the slot, or until `day_before_at` (clinic
    time) on the day before; never on the slot's own day."""

    hours_before: float | None = Field(default=None, ge=0, le=24 * 30)
    day_before_at: dt_time | None = None

    @model_validator(mode="after")
    def _one(self) -> Cancellation:
        if self.hours_before is not None and self.day_before_at is not None:
            raise ValueError("cancellation: give hours_before or day_before_at, not both")
        return self

    def deadline(self, starts_at: datetime, zone: Any) -> datetime:
        local = starts_at.astimezone(zone)
        day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.day_before_at is not None:
            chosen = datetime.combine(local.date() - timedelta(days=1), self.day_before_at,
                                      tzinfo=zone)
        else:
            hours = 24.0 if self.hours_before is None else self.hours_before
            chosen = local - timedelta(hours=hours)
        # The last moment is the earlier one; a same-day cancellation is never allowed.
        return min(chosen, day_start - timedelta(milliseconds=1))


class LimitOverrides(_Strict):
    """Per-person limits for this release; absent ones are the platform's (-1 = none)."""

    same_day_clinic: int | None = Field(default=None, ge=-1, le=100, strict=True)
    per_day: int | None = Field(default=None, ge=-1, le=100, strict=True)
    per_7_days: int | None = Field(default=None, ge=-1, le=100, strict=True)
    per_3_months: int | None = Field(default=None, ge=-1, le=100, strict=True)


class QueueSettings(_Strict):
    """Waiting room of a `mode: queue` release."""

    join_before_seconds: int = Field(default=900, ge=0, le=24 * 3600, strict=True)
    # Unused admissions at any moment stay below factor x stock released and left.
    admit_factor: float = Field(default=1.5, ge=1, le=10)
    max_admit_per_second: float = Field(default=50, gt=0, le=100_000)
    token_seconds: int = Field(default=120, ge=1, le=3600, strict=True)


class ReleaseDefinition(_Strict):
    release_id: Identifier | None = None
    vaccine: Name
    dose: int = Field(ge=1, le=10, strict=True)
    clinic_id: Identifier
    department: Name = "vaccination"
    opens_at: AwareDatetime
    closes_at: AwareDatetime
    slots: list[SlotDefinition] = Field(min_length=1, max_length=MAX_SLOTS)
    waves: list[Wave] | None = None
    eligibility: Eligibility = Field(default_factory=Eligibility)
    cancellation: Cancellation = Field(default_factory=Cancellation)
    limits: LimitOverrides = Field(default_factory=LimitOverrides)
    # How stock is handed out: first come first served (claims race), a waiting room that
    # admits in a shuffled order (queue), or a draw among applicants (lottery).
    mode: Literal["first_come", "queue", "lottery"] = "first_come"
    queue: QueueSettings = Field(default_factory=QueueSettings)

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseDefinition:
        if self.closes_at <= self.opens_at:
            raise ValueError("closes_at must be after opens_at")
        ids = [s.slot_id for s in self.slots]
        if len(set(ids)) != len(ids):
            raise ValueError("slot_id values must be unique")
        if self.waves:
            times = [w.opens_at for w in self.waves]
            if times != sorted(times) or len(set(times)) != len(times):
                raise ValueError("waves must have strictly increasing opens_at")
            if times[0] < self.opens_at or times[-1] >= self.closes_at:
                raise ValueError("every wave must open within [opens_at, closes_at)")
            if not math.isclose(sum(w.share for w in self.waves), 1.0, abs_tol=1e-6):
                raise ValueError("wave shares must sum to 1")
        return self

    @property
    def total_capacity(self) -> int:
        return sum(s.capacity for s in self.slots)

    def wave_schedule(self) -> list[tuple[datetime, int]]:
        """(time, cumulative share in parts per million); the last is exactly 10^6."""
        waves = self.waves or [Wave(opens_at=self.opens_at, share=1.0)]
        schedule, total = [], 0.0
        for i, wave in enumerate(waves):
            total += wave.share
            ppm = 1_000_000 if i == len(waves) - 1 else round(total * 1_000_000)
            schedule.append((wave.opens_at, ppm))
        return schedule


def parse_definition(data: object) -> ReleaseDefinition:
    """Validate and give the release an id when it has none; InvalidInput names each fault."""
    if not isinstance(data, dict):
        raise InvalidInput("the release definition must be a JSON object")
    try:
        # JSON's types strictly: no number for a time or a date, no string for a number.
        definition = ReleaseDefinition.model_validate_json(orjson.dumps(data), strict=True)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidInput(
            "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        ) from None
    if definition.release_id is None:
        definition = definition.model_copy(update={"release_id": f"rel-{secrets.token_hex(6)}"})
    return definition
