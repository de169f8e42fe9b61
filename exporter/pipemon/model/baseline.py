"""Robust, seasonal baselines: how unusual is a run's duration or record count for *this* pipeline?

Durations and record counts are skewed (lognormal-like), so they are judged in log space, against the median
and the MAD (median absolute deviation, scaled to a σ) of the pipeline's recent successful runs before the
run being judged. A median is not dragged by the occasional outlier, and a log-space σ makes "2σ" mean the
same for a 10-second job and a 5-hour one.

Seasonality is learned per pipeline: when the pipeline's own history shows a weekday/weekend or an
hour-of-day pattern (grouping runs by it shrinks their spread clearly), a run is judged against the runs of
its own slot only: a Saturday run against Saturdays and Sundays, a 02:00 run against earlier 02:00 runs.

A pipeline that runs every few minutes fills its ring of runs in a day or so: too short to know its week.
Its runs are also summarised per clock hour over four weeks (HourlySummary), and a run counts only as
unusual as it is against the closer of two references, its recent runs and that seasonal summary: the first
Monday run after a quiet weekend, or the first run after a holiday, is not slow for being slower than
yesterday. Until the summary has seen enough weekends to resolve hour of day × weekend, a slow run is also
judged against an additive (log-space) weekday + hour-of-day reference (two_way_reference), and counts only as
unusual as against the higher of that and the chosen profile's reference: a nightly peak on the Monday after
a quiet weekend is neither slow for the weekend nor for the hours before it.
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
IDLE_MIN_STREAKS = 3  # zero-record runs are usual for a pipeline when this many separate streaks of them ...
IDLE_MIN_SHARE = 0.02  # ... make at least this share of its runs (nothing new to load); one streak is an incident
SPREAD_SAMPLES = 100  # a baseline's spread is taken over up to this many runs of its slot
SEASONAL_GAIN = 0.75  # a profile is used when it shrinks the spread to at most this share of the flat one,
OUTLIER_SHARE = 0.02  # ... or when at least this share of runs are outliers and it explains half of them
PROFILE_EVERY = 25  # the seasonal profile is chosen again after this many new runs
HOURS_KEPT = 28 * 24  # clock hours an hourly summary keeps: four weeks, four weekends
HOURLY_SLOT_VALUES = 14  # a long-term reference is the median of this many latest hours of its slot
HOURLY_MIN_RUNS = 12  # a pipeline gets an hourly summary once this many runs fit in ...
HOURLY_MIN_SPAN = 12 * 3600.0  # ... this long (it runs about hourly or more often)


def _weekend(ts: float) -> int:
    return 1 if int(ts // 86400 + 3) % 7 >= 5 else 0  # 1970-01-01 was a Thursday (weekday 3)


def _hour(ts: float) -> int:
    return int(ts // 3600) % 24


def _daypart(ts: float) -> int:
    return int(ts // 3600) % 24 // 4


def _flat(ts: float) -> int:
    return 0


def _week_hour(ts: float) -> int:
    return _weekend(ts) * 24 + _hour(ts)


# Candidate profiles, simplest first: on a tie the simpler one wins.
PROFILES: dict[str, Callable[[float], int]] = {
    "none": _flat, "weekday": _weekend, "daypart": _daypart, "hour": _hour, "weekhour": _week_hour,
}


def _identity(x: float) -> float:
    return x


def two_way_reference(hours: Sequence[int], values: Sequence[float], ts: float) -> float:
    """An additive (log-space) weekday/weekend + hour-of-day reference for `ts` from hourly values: the weekend
    effect is the median of all weekend hours less that of all weekday hours; the hour's level is the median
    of the latest HOURLY_SLOT_VALUES values of `ts`'s clock hour, each with its day type's effect removed (one
    step of Tukey's median polish). Every day informs every hour, so both rhythms are known long before each
    weekend hour has SLOT_SAMPLES of its own. NaN when either day type or the hour is too thin."""
    points = [(h, x, _weekend(h * 3600.0 + 1800.0)) for h, x in zip(hours, values, strict=True) if not math.isnan(x)]
    weekend = [x for _, x, w in points if w]
    weekday = [x for _, x, w in points if not w]
    if len(weekend) < SLOT_SAMPLES or len(weekday) < SLOT_SAMPLES:
        return NAN
    effect = (0.0, median(weekend) - median(weekday))
    hour, clock = int(ts // 3600), _hour(ts)
    picked: list[float] = []
    for h, x, w in reversed(points):
        if h < hour and h % 24 == clock:
            picked.append(x - effect[w])
            if len(picked) == HOURLY_SLOT_VALUES:
                break
    return median(picked) + effect[_weekend(ts)] if len(picked) >= SLOT_SAMPLES else NAN


class HourlySummary:
    """Per clock hour with successful runs, the median log duration and log records of those runs, for the
    latest HOURS_KEPT such hours: a frequent pipeline's seasonal memory at one sample per hour."""

    __slots__ = ("bucket", "bucket_hour", "columns", "hours", "profiles", "references", "start")

    def __init__(self) -> None:
        self.hours = array("q")
        self.columns = {"duration": array("f"), "records": array("f")}
        self.start = 0
        self.bucket_hour = -1  # the hour being collected, not yet in the ring
        self.bucket: list[tuple[float, float]] = []  # its runs' (log duration, log records); NaN: unknown
        self.profiles: dict[str, tuple[str, int]] = {}  # column -> (profile, bucket_hour when chosen)
        self.references: dict[tuple, float] = {}  # (column, hour[, kind]) -> reference, until the next push

    def __len__(self) -> int:
        return len(self.hours)

    def add(self, ts: float, log_values: dict[str, float]) -> None:
        hour = int(ts // 3600)
        if hour < self.bucket_hour:
            return  # a late run: its hour is summarised already
        if hour > self.bucket_hour:
            self._flush()
            self.bucket_hour = hour
        self.bucket.append((log_values.get("duration", NAN), log_values.get("records", NAN)))

    def _flush(self) -> None:
        duration, records = self._bucket_medians()
        if self.bucket_hour >= 0 and not (math.isnan(duration) and math.isnan(records)):
            self._push(self.bucket_hour, duration, records)
        self.bucket = []

    def _bucket_medians(self) -> tuple[float, float]:
        known = ([x for x in column if not math.isnan(x)] for column in zip(*self.bucket, strict=True))
        duration, records = (median(xs) if xs else NAN for xs in known) if self.bucket else (NAN, NAN)
        return duration, records

    def _push(self, hour: int, duration: float, records: float) -> None:
        self.references.clear()
        if len(self.hours) < HOURS_KEPT:
            self.hours.append(hour)
            self.columns["duration"].append(duration)
            self.columns["records"].append(records)
            return
        self.hours[self.start] = hour
        self.columns["duration"][self.start] = duration
        self.columns["records"][self.start] = records
        self.start = (self.start + 1) % HOURS_KEPT

    def _ordered(self, column: array) -> list:
        return column[self.start:].tolist() + column[:self.start].tolist()

    def to_rows(self) -> list[tuple[int, float, float]]:
        """The ring's hours, oldest first."""
        return list(zip(self._ordered(self.hours), self._ordered(self.columns["duration"]),
                        self._ordered(self.columns["records"]), strict=True))

    def open_rows(self) -> list[tuple[int, float, float]]:
        """The hour being collected: one row per run of it, so that a restart goes on collecting that hour."""
        return [(self.bucket_hour, duration, records) for duration, records in self.bucket]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float]],
                  open_rows: Sequence[Sequence[float]] = ()) -> HourlySummary:
        summary = cls()
        for hour, duration, records in rows[-HOURS_KEPT:]:
            summary._push(int(hour), duration, records)
        if open_rows:
            summary.bucket_hour = int(open_rows[0][0])
            summary.bucket = [(duration, records) for _, duration, records in open_rows]
        elif rows:  # a checkpoint of an older version: its last row was the hour being collected, closed early
            summary.bucket_hour = summary.hours[-1] + 1
        return summary

    def reference(self, name: str, ts: float) -> float:
        """The log-space median of the latest hours of `ts`'s seasonal slot before `ts`'s hour; NaN when the
        summary is too thin to say."""
        key = (name, int(ts // 3600))
        if key not in self.references:  # a frequent pipeline's runs of one hour share their reference
            self.references[key] = self._reference(name, ts)
        return self.references[key]

    def highest_reference(self, name: str, ts: float) -> float:
        """The higher of `ts`'s reference under the chosen profile and its two-way reference (weekday/weekend
        plus hour of day, two_way_reference) while the chosen profile is not the combined "weekhour": how slow a
        run may be before no rhythm of the pipeline explains it. Three weekends in, the summary is too short to
        resolve a weekend slot per clock hour, and a Monday-morning peak after a quiet weekend is slow against
        both single rhythms; NaN when the summary is too thin to say."""
        key = (name, int(ts // 3600), "highest")
        if key not in self.references:
            candidates = [self.reference(name, ts)]
            hours, values = self._ordered(self.hours), self._ordered(self.columns[name])
            if len(hours) >= 2 * SLOT_SAMPLES and self.profiles.get(name, ("",))[0] != "weekhour":
                candidates.append(two_way_reference(hours, values, ts))
            known = [x for x in candidates if not math.isnan(x)]
            self.references[key] = max(known) if known else NAN
        return self.references[key]

    def _reference(self, name: str, ts: float) -> float:
        hours, values = self._ordered(self.hours), self._ordered(self.columns[name])
        if len(hours) < 2 * SLOT_SAMPLES:
            return NAN
        return self._slot_median(hours, values, ts, self._profile(name, hours, values))

    @staticmethod
    def _slot_median(hours: list[int], values: list[float], ts: float, profile: str) -> float:
        slot_of, hour = PROFILES[profile], int(ts // 3600)
        slot = slot_of(ts)
        picked: list[float] = []
        for h, x in zip(reversed(hours), reversed(values), strict=True):
            if h < hour and not math.isnan(x) and slot_of(h * 3600.0 + 1800.0) == slot:
                picked.append(x)
                if len(picked) == HOURLY_SLOT_VALUES:
                    break
        return median(picked) if len(picked) >= SLOT_SAMPLES else NAN

    def _profile(self, name: str, hours: list[int], values: list[float]) -> str:
        chosen = self.profiles.get(name)
        if chosen is None or self.bucket_hour - chosen[1] >= 24:
            timestamps = [h * 3600.0 + 1800.0 for h in hours]
            chosen = (choose_profile(timestamps, values, _identity), self.bucket_hour)
            self.profiles[name] = chosen
            self.references = {key: ref for key, ref in self.references.items() if key[0] != name}
        return chosen[0]


class RunHistory:
    """A fixed-size ring of recent successful runs: finish time, duration, records (NaN: unknown)."""

    __slots__ = ("appended", "capacity", "columns", "hourly", "loads", "profiles", "start")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.columns = {"ts": array("d"), "duration": array("d"), "records": array("d")}
        self.start = 0  # index of the oldest sample once the ring is full
        self.appended = 0  # samples ever appended (in this process)
        self.loads = 0  # runs in the ring that loaded records (> 0): zero-record ones are then no-ops
        self.profiles: dict[str, tuple[str, int]] = {}  # column -> (seasonal profile, `appended` when chosen)
        self.hourly: HourlySummary | None = None  # for pipelines that run about hourly or more often

    def __len__(self) -> int:
        return len(self.columns["ts"])

    def append(self, ts: float, duration: float, records: float, summarise: bool = True) -> None:
        self.appended += 1
        if summarise:
            self._summarise(ts, duration, records)
        row = {"ts": ts, "duration": duration, "records": records}
        self.loads += records > 0
        if len(self) < self.capacity:
            for name, column in self.columns.items():
                column.append(row[name])
            return
        self.loads -= self.columns["records"][self.start] > 0
        for name, column in self.columns.items():
            column[self.start] = row[name]
        self.start = (self.start + 1) % self.capacity

    def _summarise(self, ts: float, duration: float, records: float) -> None:
        if self.hourly is None:
            if len(self) < HOURLY_MIN_RUNS or math.isnan(ts):
                return
            earliest = self.columns["ts"][(self.start - HOURLY_MIN_RUNS) % len(self)]  # 12th latest
            if math.isnan(earliest) or ts - earliest >= HOURLY_MIN_SPAN:
                return
            self.hourly = HourlySummary()
        # a no-op's quick duration says nothing of how long the hour's loads take (its zero records do count)
        no_op = records == 0 and self.loads > 0
        self.hourly.add(ts, {"duration": NAN if no_op else log_duration(duration),
                             "records": NAN if math.isnan(records) else log_records(records)})

    def ordered(self, name: str) -> list[float]:
        """A column, oldest first."""
        column = self.columns[name]
        return column[self.start:].tolist() + column[:self.start].tolist()

    def to_rows(self) -> list[tuple[float, float, float]]:
        return list(zip(self.ordered("ts"), self.ordered("duration"), self.ordered("records"), strict=True))

    @classmethod
    def from_rows(cls, capacity: int, rows: Sequence[Sequence[float]],
                  hourly_rows: Sequence[Sequence[float]] = (),
                  hourly_open_rows: Sequence[Sequence[float]] = ()) -> RunHistory:
        history = cls(capacity)
        summarised = bool(hourly_rows or hourly_open_rows)
        for ts, duration, records in rows[-capacity:]:
            history.append(ts, duration, records, summarise=not summarised)  # else summarised already
        if summarised:
            history.hourly = HourlySummary.from_rows(hourly_rows, hourly_open_rows)
        return history

    def hourly_rows(self) -> list[tuple[int, float, float]]:
        return self.hourly.to_rows() if self.hourly is not None else []

    def hourly_open_rows(self) -> list[tuple[int, float, float]]:
        return self.hourly.open_rows() if self.hourly is not None else []

    def profile(self, name: str, to_log: Callable[[float], float]) -> str:
        """The seasonal profile of a column, chosen again every PROFILE_EVERY new runs; the durations' from the runs
        that loaded something when some did (no-ops at night would hide the daytime peak of the loads), the
        records' from all (when a pipeline idles is part of its records' rhythm)."""
        chosen = self.profiles.get(name)
        if chosen is None or self.appended - chosen[1] >= PROFILE_EVERY:
            values = self.ordered(name)
            if name == "duration" and self.loads:
                values = [NAN if r == 0 else v for v, r in zip(values, self.ordered("records"), strict=True)]
            chosen = (choose_profile(self.ordered("ts"), values, to_log), self.appended)
            self.profiles[name] = chosen
        return chosen[0]


@dataclass(frozen=True, slots=True)
class Judgement:
    """A run against its baseline. NaN everywhere when there is no baseline yet."""

    zscore: float  # (log value - log expected) / log-space σ; > 0: slower / more records
    ratio: float  # value / expected
    expected: float  # the baseline's median (of its seasonal slot)
    samples: int  # runs in the baseline
    spread: float = NAN  # the log-space σ the z-score divides by


NO_JUDGEMENT = Judgement(NAN, NAN, NAN, 0)


def log_duration(seconds: float) -> float:
    return math.log(max(seconds, 0.01))


def log_records(records: float) -> float:
    return math.log1p(max(records, 0.0))


def idle_runs_before(records: Sequence[float], index: int,
                     slots: Sequence[int | None] | None = None) -> tuple[bool, int]:
    """Whether zero-record ("idle") runs are usual before position `index`: IDLE_MIN_STREAKS streaks of them,
    at least IDLE_MIN_SHARE of the runs with known records, unless the run's seasonal slot (with `slots`) has none
    where that share would have put three (a pipeline idle at night is not idle at noon); and the longest
    streak of idle runs in a row that is still no news: one more than the longest before it, or than chance
    makes of that share over as many runs (idling at random 8% of the time gives three in a row every few
    hundred runs). Both leave out the idle runs just before it: a streak is no evidence for itself."""
    slot = slots[index] if slots is not None else None
    zeros = known = slot_zeros = slot_known = longest = streak = streaks = 0
    for i in range(index - idle_streak(records, index - 1)):
        value = records[i]
        if math.isnan(value):
            continue
        known += 1
        zeros += value == 0
        streak = streak + 1 if value == 0 else 0
        streaks += streak == 1
        longest = max(longest, streak)
        if slot is not None and slots[i] == slot:
            slot_known += 1
            slot_zeros += value == 0
    usual = streaks >= IDLE_MIN_STREAKS and zeros >= IDLE_MIN_SHARE * known
    if not usual or (slot_zeros == 0 and zeros / known * slot_known >= 3):
        return False, 0
    share = zeros / known
    by_chance = math.ceil(math.log(known) / -math.log(share)) if share < 1 else known
    return True, max(longest, by_chance) + 1


def idle_streak(records: Sequence[float], index: int) -> int:
    """Zero-record runs in a row ending at position `index` (0 for index -1)."""
    streak = 0
    while index - streak >= 0 and records[index - streak] == 0:
        streak += 1
    return streak


def same_kind(values: Sequence[float], records: Sequence[float], idle: bool) -> list[float]:
    """`values` of the runs that are idle (zero records) or not, as `idle` says; NaN for the others, which
    baseline_of skips: a quick no-op is no baseline for a real load, nor the other way round."""
    return [value if (records[i] == 0) == idle else NAN for i, value in enumerate(values)]


def log_throughput(records_per_second: float) -> float:
    # a zero-record run has no logarithm: far below any real throughput, without an infinity in the median
    return math.log(max(records_per_second, 1e-9))


def judge(values: Sequence[float], value: float, to_log: Callable[[float], float],
          from_log: Callable[[float], float], absolute_floor: float = 0.0, center_size: int = 0) -> Judgement:
    """Judge `value` against baseline `values` (raw, NaN-free, latest first) in log space: its centre is the
    median of the latest `center_size` of them (all if 0), so it follows drift; its spread is the larger
    of theirs and all the values', as a MAD of 30 runs often misses a noisy pipeline's tails."""
    if not values or math.isnan(value):
        return NO_JUDGEMENT
    logs = [to_log(v) for v in values]
    recent = logs[:center_size] if center_size else logs
    center = median(recent)
    spread = MAD_TO_SIGMA * median(abs(x - center) for x in recent)
    if len(recent) < len(logs):
        overall = median(logs)
        spread = max(spread, MAD_TO_SIGMA * median(abs(x - overall) for x in logs))
    expected = from_log(center)
    floor = math.log1p(MIN_RELATIVE_SPREAD)
    if absolute_floor and expected > 0:
        floor = max(floor, math.log1p(absolute_floor / expected))
    spread = max(spread, floor)
    return Judgement((to_log(value) - center) / spread, _ratio(value, expected), expected, len(recent), spread)


def _ratio(value: float, expected: float) -> float:
    return value / expected if expected > 0 else (1.0 if value == 0 else math.inf)


def temper(short: Judgement, value: float, reference: float, to_log: Callable[[float], float],
           from_log: Callable[[float], float], direction: int) -> Judgement:
    """`short` (against recent runs) or the same run against a long-term log-space `reference`, whichever
    finds it less unusual in `direction` (+1: higher, i.e. slower; -1: lower, i.e. fewer records)."""
    if math.isnan(short.zscore) or math.isnan(reference):
        return short
    if direction * reference <= direction * to_log(short.expected):
        return short
    expected = from_log(reference)
    return Judgement((to_log(value) - reference) / short.spread, _ratio(value, expected), expected, short.samples,
                     short.spread)


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
    best, best_key = "none", (flat_outliers, flat_spread)
    enough_outliers = flat_outliers >= max(3, OUTLIER_SHARE * len(points))
    for name, slot_of in PROFILES.items():
        if name == "none":
            continue
        spread, outliers = _fit(points, slot_of, flat_spread)
        if math.isinf(spread):
            continue
        helps = spread <= SEASONAL_GAIN * flat_spread or (enough_outliers and outliers <= flat_outliers / 2)
        if helps and (outliers, spread) < best_key:  # fewest runs it would call outliers, then tightest
            best, best_key = name, (outliers, spread)
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


def slots_of(timestamps: Sequence[float], profile: str) -> list[int | None]:
    """Each run's seasonal slot under `profile` (None: time unknown), computed once for several lookups."""
    slot_of = PROFILES[profile]
    return [None if math.isnan(ts) else slot_of(ts) for ts in timestamps]


def baseline_of(timestamps: Sequence[float], values: Sequence[float], index: int, size: int,
                profile: str, slots: Sequence[int | None] | None = None) -> list[float]:
    """The up to `size` most recent known values before position `index`, from that run's seasonal slot
    (`slots`: slots_of(timestamps, profile), when the caller has it)."""
    if slots is None:
        slots = slots_of(timestamps, profile) if profile != "none" else [0] * len(timestamps)
    slot = slots[index]
    picked: list[float] = []
    if profile != "none" and slot is not None:
        for i in range(index - 1, -1, -1):
            value = values[i]
            if slots[i] == slot and value == value:  # value == value: not NaN
                picked.append(value)
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
