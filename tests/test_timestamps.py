"""The ISO 8601 times the API answers with, formatted once per second."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from release_service.core.timefmt import iso

ZONES = [UTC, ZoneInfo("Asia/Shanghai"), ZoneInfo("Europe/Berlin"),
         ZoneInfo("America/St_Johns"), ZoneInfo("Asia/Kolkata")]
# 1900 to 2200: before and after every daylight-saving rule in the zones above.
MILLISECONDS = st.integers(min_value=-2_208_988_800_000, max_value=7_258_118_400_000)


@given(MILLISECONDS, st.sampled_from(ZONES))
def test_iso_is_datetime_isoformat(ms: int, zone: object) -> None:
    expected = datetime.fromtimestamp(ms / 1000, tz=zone).isoformat(timespec="milliseconds")  # type: ignore[arg-type]
    assert iso(ms, zone) == expected


def test_iso_across_a_daylight_saving_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    change = int(datetime(2026, 3, 29, 1, 0, tzinfo=UTC).timestamp() * 1000)  # 03:00 CEST
    assert iso(change - 1, berlin) == "2026-03-29T01:59:59.999+01:00"
    assert iso(change, berlin) == "2026-03-29T03:00:00.000+02:00"
    assert iso(change + 7, berlin) == "2026-03-29T03:00:00.007+02:00"
