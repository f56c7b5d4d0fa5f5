"""Spend windows: calendar periods in a time zone, rolling buckets and the span a rolling window sums."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from proxy.windows import BUCKETS, in_window, period_of, rolling_range, rolling_window, stale_buckets

AT = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC)


def test_a_rolling_window_sums_sixty_buckets_back_and_two_ahead() -> None:
    hour = rolling_window(3600)
    now = period_of(hour, AT, "UTC")
    prefix, first, last = rolling_range(now)
    assert prefix == "rolling:3600:" and first < now < last
    assert int(last.rsplit(":", 1)[1]) - int(first.rsplit(":", 1)[1]) == BUCKETS + 2
    assert in_window(now, period_of(hour, AT - timedelta(minutes=60), "UTC"))  # errs toward counting it
    assert not in_window(now, period_of(hour, AT - timedelta(minutes=61), "UTC"))
    assert not in_window(now, period_of(rolling_window(7200), AT, "UTC"))  # another window's buckets
    assert in_window("day:2026-11-22", "day:2026-11-22") and not in_window("day:2026-11-22", "day:2026-11-21")


@pytest.mark.parametrize("seconds", [30, 90, 401 * 86400])
def test_rolling_windows_are_whole_minutes_up_to_400_days(seconds: int) -> None:
    with pytest.raises(ValueError, match="whole number of minutes"):
        rolling_window(seconds)


def test_periods_of_one_rolling_window_sort_as_their_buckets() -> None:
    month = rolling_window(30 * 86400)
    periods = [period_of(month, AT + timedelta(hours=12 * i), "UTC") for i in range(5)]
    assert periods == sorted(periods) and len(set(periods)) == 5


def test_stale_buckets_are_those_two_windows_back_or_more() -> None:
    assert stale_buckets("rolling:3600:000000001000") == ("rolling:3600:", "rolling:3600:000000000880")
    assert stale_buckets("rolling:3600:000000000100") == ("rolling:3600:", "rolling:3600:000000000000")
    _, first, _ = rolling_range("rolling:3600:000000001000")  # type: ignore[misc]
    assert stale_buckets("rolling:3600:000000001000")[1] < first  # type: ignore[index]
    assert stale_buckets("day:2026-11-22") is None and stale_buckets("all_time") is None
