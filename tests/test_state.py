"""The state machine that applies run records: baselines, streaks, out-of-order events, retries."""

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemon.events import Abandon, Finish, Start
from pipemon.registry import PipelineSpec
from pipemon.state import Pipelines, PipelineState

SPEC = PipelineSpec("p", "data", "standard", 3600, 600, None, expected_interval_explicit=True)


def spec_for(name, team):
    return PipelineSpec(name, team or "unowned", "standard", 3600, 600, None, registered=False)


def finish(run_id, at, success=True, duration=10.0, records=None):
    return Finish("p", run_id, success, float(at), duration, records)


def apply_all(records, baseline_size=30):
    pipelines = Pipelines(baseline_size=baseline_size)
    pipelines.ensure(SPEC)
    outcomes = [pipelines.apply(r, spec_for) for r in records]
    return pipelines.get("p"), outcomes


def test_baseline_excludes_the_latest_run():
    durations = [10, 12, 11, 13, 100]
    state, _ = apply_all([finish(f"r{i}", i, duration=d) for i, d in enumerate(durations)])
    latest = state.judgements().duration[0]
    # the median (in log space: the geometric mean of the middle two) of the runs before it, not 100
    assert math.isclose(latest.expected, math.sqrt(11 * 12))
    assert latest.samples == 4
    assert math.isclose(latest.ratio, 100 / latest.expected)
    assert state.last_run_duration == 100


def test_each_recent_run_is_judged_against_the_runs_before_it():
    state, _ = apply_all([finish(f"r{i}", i, duration=float(10 + i)) for i in range(50)], baseline_size=5)
    judged = state.judgements().duration
    assert [round(j.expected, 9) for j in judged] == [56, 55, 54]  # medians of 54..58, 53..57, 52..56
    assert all(j.samples == 5 for j in judged)
    assert len(state.history) == 50


def test_history_is_bounded_and_keeps_the_newest():
    pipelines = Pipelines(baseline_size=5, history_size=8)
    pipelines.ensure(SPEC)
    for i in range(20):
        pipelines.apply(finish(f"r{i}", i, duration=float(i)), spec_for)
    assert pipelines.get("p").history.ordered("duration") == [float(i) for i in range(12, 20)]


def test_failures_are_not_baseline_samples():
    state, _ = apply_all([finish("a", 1, duration=10), finish("b", 2, duration=20), finish("c", 3, success=False)])
    assert state.history.ordered("duration") == [10, 20]
    assert math.isclose(state.judgements().duration[0].expected, 10)  # the latest success (20) against 10
    assert state.consecutive_failures == 1 and state.last_success_ts == 2 and state.last_failure_ts == 3


def test_success_ratios_count_the_latest_runs_in_order():
    runs = [finish(f"r{i}", i, success=i % 4 != 0) for i in range(1, 61)]  # every 4th fails
    runs.append(finish("late", 0.5, success=False))  # out of order: counted, not a recent run
    state, _ = apply_all(runs)
    assert state.success_ratio(10) == 7 / 10  # runs 51..60: 52, 56 and 60 failed
    assert state.success_ratio(50) == 37 / 50  # runs 11..60: 12, 16, ..., 60 failed
    assert state.runs_failure == 16


def test_the_interval_is_learned_from_start_gaps_unless_the_registry_gives_one():
    runs = [finish(f"r{i}", 1000 + i * 300 + (7 if i % 3 else 0), duration=5.0) for i in range(10)]
    state, _ = apply_all(runs)
    assert state.expected_interval() == SPEC.expected_interval_seconds  # SPEC is explicit
    pipelines = Pipelines()
    for run in runs:
        pipelines.apply(run, spec_for)  # unregistered: learned
    learned = pipelines.get("p")
    assert learned.expected_interval() in (293, 300, 307)
    assert learned.next_run_due() == learned.last_start_ts + learned.expected_interval() + 5.0  # no STARTs


def test_consecutive_failures_reset_on_success():
    runs = [finish("a", 1, False), finish("b", 2, False), finish("c", 3, False)]
    state, _ = apply_all(runs)
    assert state.consecutive_failures == 3
    state, _ = apply_all([*runs, finish("d", 4)])
    assert state.consecutive_failures == 0


def test_out_of_order_counts_but_never_moves_last_run_gauges_backwards():
    state, _ = apply_all([finish("new", 100, duration=5, records=50), finish("old", 50, False, duration=7)])
    assert (state.runs_success, state.runs_failure, state.duration_count) == (1, 1, 2)
    assert (state.last_run_ts, state.last_run_success, state.last_run_duration) == (100, True, 5)
    assert state.consecutive_failures == 0


def test_retries_are_counted_once():
    state, outcomes = apply_all([finish("a", 1, records=5), finish("a", 1, records=5), finish("a", 2, records=5)])
    assert outcomes == ["accepted", "duplicate", "duplicate"]
    assert (state.runs_success, state.records_total) == (1, 5)


def test_start_then_finish_closes_the_run_and_late_start_is_ignored():
    state, outcomes = apply_all([Start("p", "a", 5.0), Start("p", "b", 7.0)])
    assert state.oldest_start() == 5.0 and len(state.in_progress) == 2
    state, outcomes = apply_all([Start("p", "a", 5.0), finish("a", 9), Start("p", "a", 5.0)])
    assert outcomes == ["accepted", "accepted", "duplicate"]
    assert state.in_progress == {} and state.oldest_start() == 0.0


def test_abandoned_run_counts_as_failure_once():
    state, outcomes = apply_all([Start("p", "a", 5.0), Abandon("p", "a", 100.0), Abandon("p", "a", 101.0),
                                 finish("a", 102)])
    assert outcomes == ["accepted", "accepted", "duplicate", "duplicate"]
    assert (state.runs_failure, state.runs_success, state.consecutive_failures) == (1, 0, 1)
    assert math.isnan(state.last_run_duration)


def test_throughput_of_zero_records_is_zero_and_unknown_is_nan():
    state, _ = apply_all([finish("a", 1, duration=10, records=0)])
    assert state.last_run_throughput == 0.0
    state, _ = apply_all([finish("a", 1, duration=10)])
    assert math.isnan(state.last_run_throughput) and math.isnan(state.last_run_records)


def test_dedup_window_is_bounded_per_pipeline():
    pipelines = Pipelines(dedup_window=3)
    pipelines.ensure(SPEC)
    for i in range(10):
        pipelines.apply(finish(f"r{i}", i), spec_for)
    assert list(pipelines.get("p").seen) == ["r7", "r8", "r9"]


run_records = st.lists(
    st.one_of(
        st.builds(Finish, st.just("p"), st.sampled_from("abcdefgh"), st.booleans(),
                  st.floats(0, 1000), st.one_of(st.none(), st.floats(0, 500)), st.one_of(st.none(), st.integers(0, 9))),
        st.builds(Start, st.just("p"), st.sampled_from("abcdefgh"), st.floats(0, 1000)),
        st.builds(Abandon, st.just("p"), st.sampled_from("abcdefgh"), st.floats(0, 1000)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(run_records)
def test_snapshot_restore_is_exact_and_retrying_everything_changes_nothing(records):
    state, _ = apply_all(records, baseline_size=4)
    blob = msgspec.msgpack.encode(state.snapshot())
    restored = PipelineState.restore(msgspec.msgpack.decode(blob, type=type(state.snapshot())), SPEC, 4)
    assert msgspec.msgpack.encode(restored.snapshot()) == blob
    # Replaying the whole history again (a client retrying everything) changes no count.
    pipelines = Pipelines(baseline_size=4)
    pipelines.by_name["p"] = restored
    assert all(pipelines.apply(r, spec_for) == "duplicate" for r in records if not isinstance(r, Abandon)
               or r.run_id not in restored.in_progress)
    assert (restored.runs_success, restored.runs_failure) == (state.runs_success, state.runs_failure)
    assert restored.runs_success + restored.runs_failure == len({r.run_id for r in records if isinstance(r, Finish)}
                                                                | _abandoned(records))


def _abandoned(records):
    """Run ids that ended by abandonment: started, not finished before the first abandon record."""
    started, ended, abandoned = set(), set(), set()
    for r in records:
        if isinstance(r, Start) and r.run_id not in ended and r.run_id not in started:
            started.add(r.run_id)
        elif isinstance(r, Finish):
            ended.add(r.run_id)
        elif isinstance(r, Abandon) and r.run_id in started and r.run_id not in ended:
            ended.add(r.run_id)
            abandoned.add(r.run_id)
    return abandoned
