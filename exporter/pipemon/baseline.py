"""Robust, seasonal baselines: how unusual is a run's duration or record count for *this* pipeline?

Durations and record counts are skewed (lognormal-like), so they are judged in log space, against the median
and the MAD (median absolute deviation, scaled to a σ) of the pipeline's recent successful runs before the
run being judged. A median is not dragged by the occasional outlier, and a log-space σ makes "2σ" mean the
same for a 10-second job and a 5-hour one.

Seasonality is learned per pipeline: when the pipeline's own history shows a weekday/weekend or an
hour-of-day pattern (grouping runs by it shrinks their spread clearly), a run is judged against the runs of
its own slot only: a Saturday run against Saturdays and Sundays, a 02:00 run against earlier 02:00 runs.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median

NAN = math.nan
MAD_TO_SIGMA = 1.4826  # MAD × this estimates σ for normal data (here: log-normal data in log space)
MIN_RELATIVE_SPREAD = 0.05  # σ never below 5% of the value: a perfectly steady job does not alert on jitter
MIN_DURATION_SPREAD_SECONDS = 1.0  # ... nor below 1 s of duration
SLOT_SAMPLES = 6  # a seasonal slot needs this many runs before it is used
SEASONAL_GAIN = 0.75  # a profile is used when it shrinks the spread to at most this share of the flat one,
OUTLIER_SHARE = 0.02  # ... or when at least this share of runs are outliers and it explains half of them
PROFILE_EVERY = 25  # the seasonal profile is chosen again after this many new runs


def _weekend(ts: float) -> int:
    return 1 if int(ts // 86400 + 3) % 7 >= 5 else 0  # 1970-01-01 was a Thursday (weekday 3)


def _hour(ts: float) -> int:
    return int(ts // 3600) % 24


def _daypart(ts: float) -> int:
    return int(ts // 3600) % 24 // 4


def _flat(ts: float) -> int:
    return 0


# Candidate profiles, simplest first: on a tie the simpler one wins.
PROFILES: dict[str, Callable[[float], int]] = {
    "none": _flat, "weekday": _weekend, "daypart": _daypart, "hour": _hour,
}


class RunHistory:
    """A fixed-size ring of recent successful runs: finish time, duration, records (NaN: unknown)."""

    __slots__ = ("appended", "capacity", "columns", "profiles", "start")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.columns = {"ts": array("d"), "duration": array("d"), "records": array("d")}
        self.start = 0  # index of the oldest sample once the ring is full
        self.appended = 0  # samples ever appended (in this process)
        self.profiles: dict[str, tuple[str, int]] = {}  # column -> (seasonal profile, `appended` when chosen)

    def __len__(self) -> int:
        return len(self.columns["ts"])

    def append(self, ts: float, duration: float, records: float) -> None:
        self.appended += 1
        row = {"ts": ts, "duration": duration, "records": records}
        if len(self) < self.capacity:
            for name, column in self.columns.items():
                column.append(row[name])
            return
        for name, column in self.columns.items():
            column[self.start] = row[name]
        self.start = (self.start + 1) % self.capacity

    def ordered(self, name: str) -> list[float]:
        """A column, oldest first."""
        column = self.columns[name]
        return column[self.start:].tolist() + column[:self.start].tolist()

    def to_rows(self) -> list[tuple[float, float, float]]:
        return list(zip(self.ordered("ts"), self.ordered("duration"), self.ordered("records"), strict=True))

    @classmethod
    def from_rows(cls, capacity: int, rows: Sequence[Sequence[float]]) -> RunHistory:
        history = cls(capacity)
        for ts, duration, records in rows[-capacity:]:
            history.append(ts, duration, records)
        return history

    def profile(self, name: str, to_log: Callable[[float], float]) -> str:
        """The seasonal profile of a column, chosen again every PROFILE_EVERY new runs."""
        chosen = self.profiles.get(name)
        if chosen is None or self.appended - chosen[1] >= PROFILE_EVERY:
            chosen = (choose_profile(self.ordered("ts"), self.ordered(name), to_log), self.appended)
            self.profiles[name] = chosen
        return chosen[0]


@dataclass(frozen=True, slots=True)
class Judgement:
    """A run against its baseline. NaN everywhere when there is no baseline yet."""

    zscore: float  # (log value - log expected) / log-space σ; > 0: slower / more records
    ratio: float  # value / expected
    expected: float  # the baseline's median (of its seasonal slot)
    samples: int  # runs in the baseline


NO_JUDGEMENT = Judgement(NAN, NAN, NAN, 0)


def log_duration(seconds: float) -> float:
    return math.log(max(seconds, 0.01))


def log_records(records: float) -> float:
    return math.log1p(max(records, 0.0))


def judge(values: Sequence[float], value: float, to_log: Callable[[float], float],
          from_log: Callable[[float], float], absolute_floor: float = 0.0) -> Judgement:
    """Judge `value` against baseline `values` (raw, NaN-free) in log space."""
    if not values or math.isnan(value):
        return NO_JUDGEMENT
    center, sigma = center_and_sigma(values, to_log, from_log, absolute_floor)
    expected = from_log(center)
    zscore = (to_log(value) - center) / sigma
    ratio = value / expected if expected > 0 else (1.0 if value == 0 else math.inf)
    return Judgement(zscore, ratio, expected, len(values))


def center_and_sigma(values: Sequence[float], to_log: Callable[[float], float], from_log: Callable[[float], float],
                     absolute_floor: float = 0.0) -> tuple[float, float]:
    """The log-space median of baseline `values` and the σ a z-score divides by (MAD, floored)."""
    logs = [to_log(v) for v in values]
    center = median(logs)
    spread = MAD_TO_SIGMA * median(abs(x - center) for x in logs)
    expected = from_log(center)
    floor = math.log1p(MIN_RELATIVE_SPREAD)
    if absolute_floor and expected > 0:
        floor = max(floor, math.log1p(absolute_floor / expected))
    return center, max(spread, floor)


def choose_profile(timestamps: Sequence[float], values: Sequence[float],
                   to_log: Callable[[float], float]) -> str:
    """The seasonal profile that explains these runs best, or "none" when none helps clearly.

    A profile helps when grouping runs by its slots shrinks their spread (a weekly rhythm), or when it
    explains most of the runs a flat baseline would call outliers (a nightly peak a few hours long, which
    a median-based spread alone does not see)."""
    points = [(ts, to_log(v)) for ts, v in zip(timestamps, values, strict=True)
              if not math.isnan(v) and not math.isnan(ts)]
    if len(points) < 2 * SLOT_SAMPLES:
        return "none"
    flat_spread, flat_outliers = _fit(points, _flat)
    best, best_key = "none", (flat_spread, flat_outliers)
    enough_outliers = flat_outliers >= max(3, OUTLIER_SHARE * len(points))
    for name, slot_of in PROFILES.items():
        if name == "none":
            continue
        spread, outliers = _fit(points, slot_of, flat_spread)
        if math.isinf(spread):
            continue
        helps = spread <= SEASONAL_GAIN * flat_spread or (enough_outliers and outliers <= flat_outliers / 2)
        if helps and (spread, outliers) < best_key:
            best, best_key = name, (spread, outliers)
    return best


def _fit(points: list[tuple[float, float]], slot_of: Callable[[float], int],
         outlier_scale: float | None = None) -> tuple[float, int]:
    """Spread (median absolute deviation from each run's slot median) and how many runs lie beyond 3σ of
    `outlier_scale` (default: this spread); spread inf when a slot is too thin to judge."""
    slots: dict[int, list[float]] = {}
    for ts, x in points:
        slots.setdefault(slot_of(ts), []).append(x)
    if min(len(xs) for xs in slots.values()) < SLOT_SAMPLES:
        return math.inf, len(points)
    deviations = []
    for xs in slots.values():
        center = median(xs)
        deviations.extend(abs(x - center) for x in xs)
    spread = median(deviations)
    limit = 3 * MAD_TO_SIGMA * max(outlier_scale if outlier_scale is not None else spread,
                                   math.log1p(MIN_RELATIVE_SPREAD) / MAD_TO_SIGMA)
    return spread, sum(1 for d in deviations if d > limit)


def baseline_of(timestamps: Sequence[float], values: Sequence[float], index: int, size: int,
                profile: str) -> list[float]:
    """The up to `size` most recent known values before position `index`, from that run's seasonal slot."""
    slot_of = PROFILES[profile]
    slot = slot_of(timestamps[index]) if not math.isnan(timestamps[index]) else None
    picked: list[float] = []
    if profile != "none" and slot is not None:
        for i in range(index - 1, -1, -1):
            if not math.isnan(values[i]) and not math.isnan(timestamps[i]) and slot_of(timestamps[i]) == slot:
                picked.append(values[i])
                if len(picked) == size:
                    return picked
        if len(picked) >= SLOT_SAMPLES:
            return picked
    # no seasonality, or a slot too thin to judge: the most recent runs of any slot
    picked = []
    for i in range(index - 1, -1, -1):
        if not math.isnan(values[i]):
            picked.append(values[i])
            if len(picked) == size:
                break
    return picked
