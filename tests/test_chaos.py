"""The chaos suite in a short form (`loadtest/chaos.py` runs every scenario): Redis killed
mid-spike and restarted from its AOF, then relay, bookings consumer and Redis killed
together; no acknowledged claim lost, nothing oversold or doubled, every SMS sent. In
queue mode the three are killed together just after the opening: no admission lost or
doubled, no booking without its admission. On the high-availability stack (a primary,
two replicas, three sentinels, k = 1) the primary's machine is lost mid-spike, in both
modes: a replica takes over and nothing acknowledged is lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))

from chaos import SCENARIOS, Outcome, count_admissions, run

pytestmark = pytest.mark.chaos


def test_scenarios_keep_every_promise():
    names = ["redis", "relay+bookings+redis"]
    assert set(names) <= set(SCENARIOS)
    outcomes = run(names, residents=800, stock=200, appendfsync="everysec")
    for o in outcomes:
        print(o)
        assert o.acknowledged == o.stock == o.persisted == o.sms, o
        assert (o.oversold, o.duplicated, o.lost) == (0, 0, 0), o


def test_queue_mode_keeps_every_promise():
    o, = run(["relay+bookings+redis"], residents=300, stock=100, appendfsync="everysec",
             mode="queue")
    print(o)
    assert o.acknowledged == o.stock == o.persisted == o.sms, o
    assert o.admitted == o.admissions_persisted >= o.stock, o
    assert (o.oversold, o.duplicated, o.lost) == (0, 0, 0), o
    assert (o.admissions_lost, o.admitted_twice, o.unadmitted) == (0, 0, 0), o


def test_losing_the_redis_primary_keeps_every_promise():
    outcomes = run(["redis-primary-lost"], residents=300, stock=100, appendfsync="everysec",
                   redis_replicas=2, modes=("first_come", "queue"))
    for o in outcomes:
        print(o)
        assert o.acknowledged == o.stock == o.persisted == o.sms, o
        assert (o.oversold, o.duplicated, o.lost) == (0, 0, 0), o
        assert not o.broken, o


def test_admission_counts_name_each_broken_promise():
    """The counting itself: an admission only in Redis is lost, a person with two admission
    ids was admitted twice, a booking without a spent admission and a row is unadmitted."""
    o = Outcome("x", "x", 4, 2, 0, 0, 0, 0, 0, 0, 0.0, [], "queue")
    given = {"j1": "u:p1", "j2": "p2", "j3": "x:p3", "j4": "u:p4"}  # q:jtis
    stored = {"j1": "p1", "j2": "p2", "j3": "p3", "j5": "p4"}  # admission rows
    count_admissions(o, given, stored, booked=["p1", "p2", "p4", "p6"])
    assert (o.admitted, o.admissions_persisted, o.admissions_lost) == (4, 4, 1)
    assert o.admitted_twice == 1  # p4: j4 and j5
    assert o.unadmitted == 2  # p2 (admission not spent), p6 (none at all)
    assert o.broken
