"""The chaos suite in a short form (`loadtest/chaos.py` runs every scenario): Redis killed
mid-spike and restarted from its AOF, then relay, bookings consumer and Redis killed
together; no acknowledged claim lost, nothing oversold or doubled, every SMS sent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))

from chaos import SCENARIOS, run

pytestmark = pytest.mark.chaos


def test_scenarios_keep_every_promise():
    names = ["redis", "relay+bookings+redis"]
    assert set(names) <= set(SCENARIOS)
    outcomes = run(names, residents=800, stock=200, appendfsync="everysec")
    for o in outcomes:
        print(o)
        assert o.acknowledged == o.stock == o.persisted == o.sms, o
        assert (o.oversold, o.duplicated, o.lost) == (0, 0, 0), o
