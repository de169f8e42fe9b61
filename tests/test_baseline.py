"""How the exporter judges a run: log space, median/MAD, floors, and seasonality learned from history."""

import math
import random

import msgspec

from pipemon.model.baseline import (
    NAN,
    HourlySummary,
    RunHistory,
    choose_profile,
    judge,
    log_duration,
    log_records,
    two_way_reference,
)
from pipemon.model.events import Finish
from pipemon.model.registry import PipelineSpec
from pipemon.model.state import Pipelines, PipelineState, Snapshot

HOUR, DAY = 3600, 86400
T0 = 1_767_225_600  # Thursday 2026-01-01 00:00 UTC


def history_of(duration_at, runs: int, every: float = HOUR, sigma: float = 0.15, seed: int = 1) -> Pipelines:
    """A pipeline's successful runs every `every` seconds, lognormal around `duration_at(t)`."""
    rng = random.Random(seed)
    pipelines = Pipelines()
    spec = PipelineSpec("p", "data", "standard", every, 4 * HOUR, None, expected_interval_explicit=True)
    pipelines.ensure(spec)
    for i in range(runs):
        start = T0 + i * every
        duration = duration_at(start) * math.exp(sigma * rng.gauss(0, 1))
        pipelines.apply(Finish("p", f"r{i}", True, start + duration, duration, int(duration * 100)),
                        lambda name, team: spec)
    return pipelines


def is_night(ts: float) -> bool:
    return 1 <= int(ts // HOUR) % 24 < 4


def test_a_skewed_outlier_in_the_baseline_does_not_hide_the_next_one():
    baseline = [100.0] * 20 + [900.0]  # one very slow run in the history
    verdict = judge(baseline, 400.0, log_duration, math.exp, 1.0)
    assert math.isclose(verdict.expected, 100.0)  # the median ignores the outlier
    assert verdict.zscore > 3 and math.isclose(verdict.ratio, 4.0)


def test_spread_floors_keep_a_steady_pipeline_quiet():
    verdict = judge([60.0] * 30, 62.0, log_duration, math.exp, 1.0)  # zero spread, +2 s
    assert 0 < verdict.zscore < 1  # floored at 5% of the value, not a division by zero
    short = judge([2.0] * 30, 3.0, log_duration, math.exp, 1.0)  # +1 s on a 2 s job is jitter
    assert short.zscore < 1.01  # ln(3/2) / ln(1 + 1 s / 2 s): exactly one floored σ


def test_zero_records_against_a_normal_baseline_is_far_below():
    verdict = judge([5000.0, 5200.0, 4900.0] * 5, 0.0, log_records, math.expm1)
    assert verdict.ratio == 0 and verdict.zscore < -50


def test_a_nightly_peak_is_learned_and_its_runs_are_not_anomalies():
    pipelines = history_of(lambda t: 1200.0 if is_night(t) else 600.0, runs=24 * 14 + 2)  # ends at 01:00
    state = pipelines.get("p")
    judged = state.judgements()
    assert judged.duration_profile in ("hour", "daypart")
    latest = judged.duration[0]  # a 01:00 run of about 1200 s
    assert 900 < latest.expected < 1600 and abs(latest.zscore) < 2


def test_without_a_rhythm_no_profile_is_used():
    pipelines = history_of(lambda t: 600.0, runs=24 * 14)
    assert pipelines.get("p").judgements().duration_profile == "none"


def test_a_weekend_dip_in_volume_is_learned():
    rng = random.Random(3)
    timestamps = [T0 + i * DAY / 4 for i in range(4 * 60)]
    weekend = [int(ts // DAY + 3) % 7 >= 5 for ts in timestamps]
    records = [(2000 if w else 10000) * math.exp(0.1 * rng.gauss(0, 1)) for w in weekend]
    assert choose_profile(timestamps, records, log_records) == "weekday"


def test_a_slow_run_at_the_peak_is_still_caught():
    def duration_at(t: float) -> float:
        slow = t >= T0 + (24 * 14 + 1) * HOUR  # the last run: three times the usual night
        return (1200.0 if is_night(t) else 600.0) * (3 if slow else 1)

    latest = history_of(duration_at, runs=24 * 14 + 2).get("p").judgements().duration[0]
    assert latest.zscore > 3 and latest.ratio > 2


def test_history_rows_survive_a_round_trip():
    history = RunHistory(4)
    for i in range(6):
        history.append(float(i), float(10 + i), float("nan") if i == 5 else float(i * 100))
    again = RunHistory.from_rows(4, history.to_rows())
    assert again.ordered("duration") == [12.0, 13.0, 14.0, 15.0]
    assert math.isnan(again.ordered("records")[-1])


def weekend(ts: float) -> bool:
    return int(ts // DAY + 3) % 7 >= 5


def five_minute_history(slow_last: int = 0) -> Pipelines:
    """A 5-minute pipeline, twice as slow on weekdays as at weekends, from a Thursday to the first run of a
    Monday two weeks and a half later; its last `slow_last` runs three times as slow."""
    runs = 18 * 24 * 12 + 1
    first_slow = T0 + (runs - slow_last) * 300
    return history_of(lambda t: (50.0 if weekend(t) else 100.0) * (3 if slow_last and t >= first_slow else 1),
                      runs=runs, every=300, sigma=0.1)


def test_a_frequent_pipeline_remembers_its_weekend():
    state = five_minute_history().get("p")
    assert state.history.hourly is not None and len(state.history.hourly) > 14 * 24
    monday = state.judgements().duration[0]  # Monday 00:00, after a weekend at half the duration
    assert abs(monday.zscore) < 2 and 0.8 < monday.ratio < 1.25
    state.history.hourly = None  # the ring alone (a day and a bit) remembers only the weekend
    state._judged = None
    assert state.judgements().duration[0].ratio > 1.6


def test_a_slowdown_of_a_frequent_pipeline_is_caught_against_both_references():
    latest = five_minute_history(slow_last=3).get("p").judgements().duration
    assert all(j.zscore > 3 and j.ratio > 2 for j in latest)


def test_the_hourly_summary_survives_a_restart():
    state = five_minute_history().get("p")
    snap = msgspec.msgpack.decode(msgspec.msgpack.encode(state.snapshot()), type=Snapshot)
    again = PipelineState.restore(snap, state.spec, state.baseline_size)
    assert again.history.hourly_rows() == state.history.hourly_rows()
    assert again.judgements().duration[0] == state.judgements().duration[0]


def test_the_spread_comes_from_more_runs_than_the_centre():
    rng = random.Random(5)
    tight = [100.0 * math.exp(0.02 * rng.gauss(0, 1)) for _ in range(30)]
    wide = [100.0 * math.exp(0.4 * rng.gauss(0, 1)) for _ in range(70)]
    alone = judge(tight, 180.0, log_duration, math.exp, 1.0)
    both = judge(tight + wide, 180.0, log_duration, math.exp, 1.0, center_size=30)
    assert alone.zscore > 5 and both.zscore < 2.5  # a noisy pipeline's quiet month is not its spread
    assert both.samples == 30 and math.isclose(both.expected, alone.expected)


def test_a_restored_hourly_summary_goes_on_collecting_its_hour():
    """A restart in the middle of an hour changes nothing: the restored summary and one that ran on agree."""
    summary = HourlySummary()
    for minute in range(0, 60, 5):  # one hour of runs, then a restart in the middle of the next
        summary.add(T0 + minute * 60, {"duration": 1.0, "records": 2.0})
    summary.add(T0 + 3600 + 60, {"duration": 3.0, "records": 4.0})
    again = HourlySummary.from_rows(summary.to_rows(), summary.open_rows())
    for restored in (summary, again):
        restored.add(T0 + 3600 + 600, {"duration": 9.0, "records": NAN})  # the hour it was restored in
        restored.add(T0 + 3600 + 900, {"duration": 8.0, "records": 7.0})
        restored.add(T0 + 7200 + 60, {"duration": 5.0, "records": 6.0})  # the next hour
    assert again.to_rows() == summary.to_rows() and again.open_rows() == summary.open_rows()
    assert [row[1:] for row in again.to_rows()] == [(1.0, 2.0), (8.0, 5.5)]


def test_a_summary_of_an_older_checkpoint_does_not_count_its_last_hour_twice():
    summary = HourlySummary()
    for minute in range(0, 60, 5):
        summary.add(T0 + minute * 60, {"duration": 1.0, "records": 2.0})
    summary.add(T0 + 3600 + 60, {"duration": 3.0, "records": 4.0})
    older = [*summary.to_rows(), (summary.bucket_hour, 3.0, 4.0)]  # the open hour, saved as if complete
    again = HourlySummary.from_rows(older)
    again.add(T0 + 3600 + 600, {"duration": 9.0, "records": 9.0})  # same hour as the restored last row
    again.add(T0 + 7200 + 60, {"duration": 5.0, "records": 6.0})  # the next hour: flushes nothing twice
    again.add(T0 + 3 * 3600, {"duration": 5.0, "records": 6.0})
    first = int(T0 // 3600)
    assert [row[0] for row in again.to_rows()] == [first, first + 1, first + 2]
    assert [row[0] for row in again.open_rows()] == [first + 3]


def peak_after_weekend(slow: float = 1.0) -> PipelineState:
    """A 30-minute pipeline at half its duration at weekends, with a nightly peak (02:00-04:00, 2.5 ×), from a
    Thursday to the peak of the second Monday, 11 days on (two weekends: too few for a weekend slot per clock
    hour); its last run `slow` × as slow."""
    def duration_at(t: float) -> float:
        peak = 2.5 if 2 <= int(t // HOUR) % 24 < 4 else 1.0
        last = t >= T0 + (11 * 48 + 5) * 1800
        return (100.0 if weekend(t) else 200.0) * peak * (slow if last else 1.0)

    return history_of(duration_at, runs=11 * 48 + 6, every=1800, sigma=0.1).get("p")


def test_a_monday_peak_after_a_quiet_weekend_is_not_slow():
    state = peak_after_weekend()
    monday = state.judgements().duration[0]  # Monday 02:30, the peak, after a weekend at half the duration
    assert state.history.hourly is not None and state.history.hourly.profiles["duration"][0] != "weekhour"
    assert 0.8 < monday.ratio < 1.25 and monday.zscore < 2


def test_a_slow_run_at_a_monday_peak_is_still_caught():
    monday = peak_after_weekend(slow=3.0).judgements().duration[0]
    assert monday.zscore > 3 and monday.ratio > 2


def test_the_two_way_reference_adds_the_weekend_to_the_hour():
    hours = list(range(int(T0 // HOUR), int(T0 // HOUR) + 17 * 24))  # Thursday to Saturday, 17 days on
    values = [math.log((100.0 if weekend(h * HOUR) else 200.0) * (2.5 if h % 24 == 2 else 1.0)) for h in hours]
    monday_2am = (hours[-1] + 1 + 24 + 2) * HOUR + 60.0  # past the end: Monday 02:01
    sunday_2am = (hours[-1] + 1 + 2) * HOUR + 60.0
    assert math.isclose(math.exp(two_way_reference(hours, values, monday_2am)), 500.0)
    assert math.isclose(math.exp(two_way_reference(hours, values, sunday_2am)), 250.0)
