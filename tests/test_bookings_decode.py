"""The bookings consumer's decoding of claim, cancellation and admission events (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from aiokafka import ConsumerRecord

from consumers.bookings import AdmissionEvent, BookingEvent, decode
from consumers.runner import InvalidMessage
from release_service.core import topics

CLAIM = {"claim_id": "c1", "code": "12345678", "release_id": "r1", "slot_id": "s1",
         "person_id": "p1", "account_id": "a1", "claimed_at_ms": 1_790_000_000_000}
ADMISSION = {"claim_id": "admission-j1", "admission_id": "j1", "release_id": "r1",
             "person_id": "p1", "position": 3, "admitted_at_ms": 1_790_000_000_000,
             "expires_at_ms": 1_790_000_120_000}


def record(value: dict | bytes, topic: str) -> ConsumerRecord:
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    return ConsumerRecord(topic, 0, 1, 0, 0, b"p1", data, None, 0, len(data), [])


def test_decode_each_kind():
    claim = decode(record(CLAIM, topics.CLAIMS))
    assert isinstance(claim, BookingEvent) and claim.kind == "claim"
    cancel = decode(record({**CLAIM, "cancelled_at_ms": 1_790_000_060_000},
                           topics.CANCELLATIONS))
    assert isinstance(cancel, BookingEvent) and cancel.kind == "cancel"
    assert decode(record(ADMISSION, topics.ADMISSIONS)) == AdmissionEvent(
        "j1", "r1", "p1", 3, datetime(2026, 9, 21, 14, 13, 20, tzinfo=UTC),
        datetime(2026, 9, 21, 14, 15, 20, tzinfo=UTC))


@pytest.mark.parametrize("value", [
    b"not json", b"[]",
    *({k: v for k, v in ADMISSION.items() if k != name}
      for name in ("admission_id", "release_id", "person_id", "position", "admitted_at_ms",
                   "expires_at_ms")),
    {**ADMISSION, "position": 0}, {**ADMISSION, "position": True},
    {**ADMISSION, "person_id": ""}, {**ADMISSION, "admitted_at_ms": "soon"},
])
def test_an_admission_event_that_cannot_be_persisted_is_refused(value):
    with pytest.raises(InvalidMessage):
        decode(record(value, topics.ADMISSIONS))
