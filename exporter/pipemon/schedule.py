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
