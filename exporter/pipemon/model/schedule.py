"""Cron schedules (5 fields, UTC) of registered pipelines: validation and the next fire time."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from cronsim import CronSim, CronSimError


def check(expression: str) -> None:
    """Raise ValueError naming what is wrong with a cron expression."""
    if len(expression.split()) != 5:
        raise ValueError(f"schedule {expression!r} must be a cron expression of 5 fields"
                         " (minute hour day-of-month month day-of-week), in UTC")
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"schedule {expression!r} is not a valid cron expression: {exc}") from exc


@lru_cache(maxsize=65536)
def next_fire(expression: str, after: float) -> float:
    """The first fire time of `expression` strictly after the Unix time `after`."""
    start = datetime.fromtimestamp(after, UTC).replace(microsecond=0)
    return next(CronSim(expression, start)).timestamp()


def typical_interval(expression: str, around: float) -> float:
    """The gap between the two fires after `around`: what "every N" the schedule means there."""
    first = next_fire(expression, around)
    return next_fire(expression, first) - first


DAY = 86400.0
WEEK = 7 * DAY
MONDAY = 4 * DAY  # 1970-01-05, the first Monday of the Unix epoch
WEEKS_KEPT = 3  # this week and the two before it


def week_of(ts: float) -> int:
    return int((ts - MONDAY) // WEEK)


def weekday_of(ts: float) -> int:
    return int((ts - MONDAY) // DAY) % 7  # Monday 0


def learn_weekday(masks: list[int], week: int, started: float) -> tuple[list[int], int]:
    """The weekdays runs started on, per week (latest week first, WEEKS_KEPT weeks), with `started` in."""
    started_week = week_of(started)
    if started_week > week:
        shift = min(started_week - week, WEEKS_KEPT)
        masks = ([0] * shift + masks)[:WEEKS_KEPT]
        week = started_week
    elif started_week < week - (WEEKS_KEPT - 1):
        return masks, week  # too old to matter
    masks = (masks + [0] * WEEKS_KEPT)[:WEEKS_KEPT]
    masks[week - started_week] |= 1 << weekday_of(started)
    return masks, week


def skip_quiet_days(masks: list[int], week: int, due: float) -> float:
    """`due`, moved on by whole days while it falls on a weekday the pipeline did not run on in either of the
    two complete weeks before (a weekdays-only job without a schedule is not overdue on Saturday). Only once
    the pipeline ran in both of those weeks; never more than six days."""
    if len(masks) < WEEKS_KEPT or not (masks[1] and masks[2]) or week_of(due) < week:
        return due
    active = masks[0] | masks[1] | masks[2]
    for _ in range(6):
        if active & (1 << weekday_of(due)):
            break
        due += DAY
    return due
