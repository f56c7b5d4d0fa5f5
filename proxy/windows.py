"""Spend windows: the period a charge is counted in, for calendar and rolling windows. Pure, no I/O.

Calendar windows (``hour``, ``day``, ``week``, ``month``, ``all_time``) are periods of the policy's time
zone: a charge counts in the period it was made in, and the total starts again at the next one. An hour's
period carries the zone's UTC offset, so the hour a DST change repeats (01:00 twice in New York each
November) is two periods, not one two hours long; a day is the local date (23 or 25 hours across a change).

Rolling windows (``rolling: 1h``, ``24h``, ``30d``) are counted in ``BUCKETS`` buckets of a sixtieth of
the window each (1h: one minute; 24h: 24 minutes; 30d: 12 hours), aligned on the Unix epoch. A charge is
counted in the bucket of its instant (its period, e.g. ``rolling:3600:000000483912``, so a release or a
partial capture hits the same row). The window checked at instant t is every bucket from the one holding
``t - window`` to the one holding t: ``BUCKETS + 1`` buckets, which cover the whole window and at most one
bucket more. So the window errs toward refusing: a payment stays counted between ``window`` and
``window + bucket`` after it was made, never less; the limit is never exceeded over any span of the
window's length. The ``AHEAD`` buckets after t's are summed too: a replica whose clock runs a little
ahead counts in a later bucket, and what it counted must not be missed.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

CALENDAR = ("hour", "day", "week", "month", "all_time")
ROLLING = "rolling:"  # a limit's window "rolling:<seconds>"
BUCKETS = 60
AHEAD = 2  # buckets after now's also summed (a replica's clock ahead of this one's)
MAX_ROLLING = 400 * 86400
_DIGITS = 12  # a bucket's index, zero-padded: periods of one window sort as their buckets do


def rolling_window(seconds: float) -> str:
    """The window of a ``rolling:`` limit; ValueError when it is not a whole number of minutes."""
    if seconds < 60 or seconds % 60 or seconds > MAX_ROLLING:
        raise ValueError(
            "a rolling window is a whole number of minutes, from 1m to 400d (such as 1h, 24h or 30d)"
        )
    return f"{ROLLING}{int(seconds)}"


def is_rolling(window_or_period: str) -> bool:
    return window_or_period.startswith(ROLLING)


def bucket_seconds(window_seconds: int) -> int:
    return window_seconds // BUCKETS


@lru_cache(maxsize=256)  # a payment asks twice for the same instant: for its totals, then its charges
def period_of(window: str, now: datetime, timezone: str) -> str:
    """The period of ``window`` a charge made at ``now`` is counted in."""
    if is_rolling(window):
        seconds = int(window.removeprefix(ROLLING))
        index = int(now.timestamp()) // bucket_seconds(seconds)
        return f"{ROLLING}{seconds}:{index:0{_DIGITS}d}"
    if window == "all_time":
        return "all_time"
    local = now.astimezone(ZoneInfo(timezone))
    if window == "hour":
        return f"hour:{local:%Y-%m-%dT%H%z}"
    if window == "day":
        return f"day:{local.date().isoformat()}"
    if window == "week":
        year, week, _ = local.isocalendar()
        return f"week:{year}-W{week:02d}"
    return f"month:{local.year}-{local.month:02d}"


def rolling_range(period: str) -> tuple[str, str, str] | None:
    """For a rolling period (the bucket of now): (prefix, first, last) of the buckets its window sums,
    in string order among periods starting with ``prefix``; None for a calendar period."""
    if not is_rolling(period):
        return None
    seconds, _, index = period.removeprefix(ROLLING).partition(":")
    prefix = f"{ROLLING}{seconds}:"
    first = max(int(index) - BUCKETS, 0)
    return prefix, f"{prefix}{first:0{_DIGITS}d}", f"{prefix}{int(index) + AHEAD:0{_DIGITS}d}"


def stale_buckets(period: str) -> tuple[str, str] | None:
    """For a rolling period (the bucket of now): (prefix, end), where every period from ``prefix`` up to,
    not including, ``end`` is a bucket two windows back or more, which no check sums any more (a check
    reaches one window and ``AHEAD`` buckets). The Redis gate drops the same buckets as it counts."""
    bounds = rolling_range(period)
    if bounds is None:
        return None
    index = bucket_of(period)[1]
    return bounds[0], f"{bounds[0]}{max(index - 2 * BUCKETS, 0):0{_DIGITS}d}"


def bucket_of(period: str) -> tuple[str, int]:
    """A rolling period as (the window's key, the bucket's index): ``rolling:3600``, 483912."""
    window, _, index = period.rpartition(":")
    return window, int(index)


def in_window(current: str, period: str) -> bool:
    """Whether a charge counted in ``period`` counts toward the window whose current period is
    ``current`` (replay simulates spend this way)."""
    bounds = rolling_range(current)
    if bounds is None:
        return period == current
    prefix, first, last = bounds
    return period.startswith(prefix) and first <= period <= last
