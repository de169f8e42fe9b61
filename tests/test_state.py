"""The state machine that applies run records: baselines, streaks, out-of-order events, retries."""

import bisect
import logging
import math
import random
import statistics

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemon.model.events import Abandon, Finish, Start
from pipemon.model.registry import PipelineSpec
from pipemon.model.state import Pipelines, PipelineState

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
                                 Start("p", "a", 5.0)])
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


# ---- abandoned runs (issue 14): judged in the data's own time, replaced by a finish that arrives after all ----


def facts(state):
    """What a pipeline exports about its runs: counts, histogram, streak, last-run facts and baselines."""
    return (state.runs_success, state.runs_failure, list(state.bucket_counts), state.duration_sum,
            state.duration_count, state.records_total, state.last_run_ts, state.last_success_ts,
            state.last_run_success, repr(state.last_run_duration), repr(state.last_run_records),
            repr(state.last_run_throughput), state.consecutive_failures, dict(state.in_progress),
            repr(state.history.to_rows()), state.outcomes, state.outcome_count, state.last_failure_ts)


def test_an_abandonment_counts_at_the_runs_own_time_never_the_sweeps():
    state, _ = apply_all([Start("p", "a", 5.0), Abandon("p", "a", 1000.0)])
    assert (state.runs_failure, state.last_run_ts, state.last_run_success, state.consecutive_failures) == \
        (1, 5.0, False, 1)
    # Runs that finished after it started stay the latest run; the abandonment does not join the streak.
    state, _ = apply_all([Start("p", "a", 5.0), finish("b", 50), Abandon("p", "a", 1000.0), finish("c", 40)])
    assert (state.runs_failure, state.runs_success) == (1, 2)
    assert (state.last_run_ts, state.last_run_success, state.consecutive_failures) == (50, True, 0)


def test_a_finish_after_the_abandonment_replaces_it():
    for success in (True, False):
        history = [finish("x", 1, records=3), Start("p", "a", 5.0)]
        done = finish("a", 20, success=success, duration=15.0, records=7)
        late, outcomes = apply_all([*history, Abandon("p", "a", 900.0), done])
        live, _ = apply_all([*history, done])
        assert outcomes[-2:] == ["accepted", "accepted"]
        assert facts(late) == facts(live)
        assert late.runs_reverted == 1 and late.abandoned == {} and late.last_abandoned == ""
    # A finish stamped before its own START (the clocks of two hosts): the run before the abandonment is the
    # yardstick again, so the finish is the latest run as it would be live.
    history = [finish("x", 1), Start("p", "a", 5.0)]
    late, _ = apply_all([*history, Abandon("p", "a", 5.0), finish("a", 3)])
    live, _ = apply_all([*history, finish("a", 3)])
    assert facts(late) == facts(live) and late.last_run_ts == 3
    # The same finish again, and a retried START, are duplicates.
    pipelines = Pipelines()
    for record in [Start("p", "a", 5.0), Abandon("p", "a", 5.0), finish("a", 20)]:
        pipelines.apply(record, spec_for)
    assert [pipelines.apply(r, spec_for) for r in (finish("a", 20), Start("p", "a", 5.0))] == ["duplicate"] * 2
    assert pipelines.reverted == 1


def test_a_late_finish_takes_the_abandonment_out_of_the_streak():
    # Abandoned, then other runs; the abandoned run's finish arrives last (as a live sequence would apply it).
    for between, success in [("failure", True), ("failure", False), ("success", True), ("success", False)]:
        base = [finish("s", 1), Start("p", "a", 2.0)]
        other = finish("b", 3, success=between == "success")
        done = finish("a", 4, success=success)
        late, _ = apply_all([*base, Abandon("p", "a", 2.0), other, done])
        live, _ = apply_all([*base, other, done])
        assert facts(late) == facts(live), (between, success)


def test_several_abandonments_taken_back_in_any_order_leave_the_live_facts():
    base = [finish("s", 1, duration=3.0), Start("p", "a", 2.0), Start("p", "b", 3.0)]
    for order in (("a", "b"), ("b", "a")):
        done = {"a": finish("a", 10, duration=8.0), "b": finish("b", 11, success=False, duration=8.0)}
        late, _ = apply_all([*base, Abandon("p", "a", 2.0), Abandon("p", "b", 3.0), *(done[r] for r in order)])
        live, _ = apply_all([*base, *(done[r] for r in order)])
        assert facts(late) == facts(live), order
        assert late.runs_reverted == 2


def test_the_dedup_window_forgets_abandoned_runs_with_their_ids():
    pipelines = Pipelines(dedup_window=2)
    pipelines.ensure(SPEC)
    for record in [Start("p", "a", 1.0), Abandon("p", "a", 1.0), finish("b", 2), finish("c", 3)]:
        pipelines.apply(record, spec_for)
    state = pipelines.get("p")
    assert state.abandoned == {}
    assert pipelines.apply(finish("a", 4), spec_for) == "accepted"  # beyond the window: a new run
    assert (state.runs_success, state.runs_failure, state.runs_reverted) == (3, 1, 0)


LIMIT = 30.0  # 3 × a max runtime of 10 s


def overdue(records, now):
    state, _ = apply_all(records)
    return [run_id for run_id, _ in state.overdue(now, LIMIT)]


def test_a_live_run_that_never_finishes_is_overdue_after_its_time():
    assert overdue([Start("p", "a", 1000.0)], 1029.0) == []
    assert overdue([Start("p", "a", 1000.0)], 1031.0) == ["a"]  # the pipeline went quiet: wall clock
    busy = [Start("p", "a", 1000.0), *(finish(f"r{i}", 1000.0 + i) for i in range(40))]
    assert overdue(busy, 1031.0) == ["a"]


def test_a_replayed_backlog_is_not_overdue_while_it_replays():
    now = 100_000.0
    # START five hours old, arriving now, its finish still to come in the same replay.
    late_start = Start("p", "a", now - 18_000, None, now)
    assert overdue([late_start], now + 1) == []
    # A replay slower than the limit: the data clock has not passed the run's allowance yet.
    slow = [late_start, *(finish(f"r{i}", now - 18_000 + i) for i in range(20))]
    slow = [r if isinstance(r, Start) else msgspec.structs.replace(r, received_at=now + 100) for r in slow]
    assert overdue(slow, now + 100) == []
    # Live events of the same pipeline (a second sender) do not make the replayed START overdue at once...
    mixed = [finish("live", now), late_start]
    assert overdue(mixed, now + 5) == []
    # ...and it still ends after its time, counted from its arrival, when its finish never comes.
    assert overdue(mixed, now + LIMIT + 1) == ["a"]
    assert overdue([late_start], now + LIMIT + 1) == ["a"]


def test_a_backlog_run_without_finish_is_overdue_once_the_replayed_data_passed_it():
    now = 100_000.0
    start = Start("p", "a", now - 18_000, None, now)
    later = [msgspec.structs.replace(finish(f"r{i}", now - 18_000 + 60 * i), received_at=now + 40) for i in range(5)]
    assert overdue([start, *later], now + 40) == ["a"]  # 240 s of data after its start, 40 s after arrival


def test_checkpoints_and_log_records_from_before_keep_loading():
    state, _ = apply_all([finish("a", 1, records=2), Start("p", "b", 5.0)])
    old = msgspec.msgpack.encode(list(msgspec.structs.astuple(state.snapshot(7)))[:20])  # no issue-14 fields
    snap = msgspec.msgpack.decode(old, type=type(state.snapshot()))
    restored = PipelineState.restore(snap, SPEC, 30)
    assert (restored.runs_success, restored.in_progress, restored.data_clock, restored.abandoned) == \
        (1, {"b": 5.0}, 0.0, {})
    assert restored.overdue(5.0 + LIMIT + 1, LIMIT) == [("b", 5.0)]  # as before: by its start
    # A Start, Finish and Abandon as written before: no arrival field; the Abandon at the sweep's time.
    decoder = msgspec.msgpack.Decoder(Start | Finish | Abandon)
    records = [decoder.decode(msgspec.msgpack.encode(r)) for r in (["s", "p", "c", 9.0, None],
                                                                    ["a", "p", "c", 5000.0])]
    pipelines = Pipelines()
    pipelines.by_name["p"] = restored
    assert [pipelines.apply(r, spec_for) for r in records] == ["accepted", "accepted"]
    assert (restored.last_run_ts, restored.runs_failure) == (9.0, 1)


live_runs = st.lists(
    st.tuples(st.floats(0, 1000), st.floats(0, 100), st.booleans(), st.booleans()),  # start, duration, ok, abandon
    min_size=1, max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(live_runs, st.randoms(use_true_random=False))
def test_abandonments_taken_back_by_their_finishes_leave_what_live_traffic_gives(runs, rng):
    """Runs sent live (START, then the finish, all in time order); some are abandoned between the two. Once
    every finish has arrived the pipeline says exactly what it says without the abandonments."""
    events = []
    for i, (start, duration, ok, abandon) in enumerate(runs):
        events.append((start, 0, Start("p", f"r{i}", start)))
        events.append((start + duration, 2, finish(f"r{i}", start + duration, ok, duration)))
        if abandon:  # the sweep got to it at some point before its finish
            events.append((rng.uniform(start, start + duration), 1, Abandon("p", f"r{i}", start)))
    events.sort(key=lambda e: (e[0], e[1]))
    late, _ = apply_all([e[2] for e in events], baseline_size=4)
    live, _ = apply_all([e[2] for e in events if not isinstance(e[2], Abandon)], baseline_size=4)
    assert facts(late) == facts(live)
    assert late.runs_reverted == sum(1 for *_, abandon in runs if abandon)


def test_a_checkpoint_keeps_the_data_clock_arrivals_and_abandonments():
    now = 100_000.0
    # A live event of now, then a replayed backlog's STARTs: only their arrival keeps them from being overdue.
    state, _ = apply_all([finish("x", now - 20_000), Start("p", "a", now - 18_000, None, now),
                          Start("p", "b", now - 18_000, None, now), Abandon("p", "b", now - 18_000),
                          Start("p", "c", now - 18_000, None, now), finish("live", now)])
    blob = msgspec.msgpack.encode(state.snapshot())
    restored = PipelineState.restore(msgspec.msgpack.decode(blob, type=type(state.snapshot())), SPEC, 30)
    for when in (now + 10, now + LIMIT + 1):
        assert restored.overdue(when, LIMIT) == state.overdue(when, LIMIT)
    assert restored.overdue(now + 10, LIMIT) == []
    assert [run_id for run_id, _ in restored.overdue(now + LIMIT + 1, LIMIT)] == ["a", "c"]
    pipelines = Pipelines()
    pipelines.by_name["p"] = restored
    assert pipelines.apply(finish("b", now - 17_990), spec_for) == "accepted"
    assert (restored.runs_failure, restored.runs_success, restored.runs_reverted) == (0, 3, 1)
    assert (restored.last_run_ts, restored.consecutive_failures) == (now, 0)


def test_abandonments_taken_back_out_of_order_never_leave_a_taken_back_failure_as_the_latest_run():
    # a and b abandoned, b the latest run; a's finish comes first, then b's, stamped before b's own START (the
    # clocks of two hosts). Neither run failed: the latest run must not be a's abandonment.
    records = [finish("x", 1), Start("p", "a", 5.0), Start("p", "b", 6.0), Abandon("p", "a", 5.0),
               Abandon("p", "b", 6.0), finish("a", 5.5), finish("b", 4)]
    state, _ = apply_all(records)
    assert (state.runs_success, state.runs_failure, state.consecutive_failures) == (3, 0, 0)
    assert state.last_run_success and state.last_run_ts >= 4


MONDAY = 1_767_571_200  # Monday 2026-01-05 00:00 UTC


def hourly_runs(days: range, weekdays: set[int]) -> Pipelines:
    """An unregistered pipeline (interval learned) starting a run every hour of the given days since MONDAY,
    on the given weekdays only (Monday 0)."""
    pipelines = Pipelines()
    for day in days:
        if day % 7 not in weekdays:
            continue
        for hour in range(24):
            start = MONDAY + day * 86400 + hour * 3600
            pipelines.apply(Start("p", f"r{day}-{hour}", start), spec_for)
            pipelines.apply(finish(f"r{day}-{hour}", start + 60, duration=60.0), spec_for)
    return pipelines


def test_a_weekdays_only_pipeline_without_a_schedule_is_not_due_at_the_weekend():
    three_weeks = hourly_runs(range(19), weekdays={0, 1, 2, 3, 4})  # ends Friday of the third week
    state = three_weeks.get("p")
    assert state.next_run_due() == MONDAY + 21 * 86400  # Friday 23:00 + 1 h is Saturday: the Monday after
    every_day = hourly_runs(range(19), weekdays=set(range(7))).get("p")
    assert every_day.next_run_due() == every_day.last_start_ts + 3600
    one_week = hourly_runs(range(5), weekdays={0, 1, 2, 3, 4}).get("p")  # too little history to know
    assert one_week.next_run_due() == one_week.last_start_ts + 3600


def test_weekday_activity_survives_a_restart():
    state = hourly_runs(range(19), weekdays={0, 1, 2, 3, 4}).get("p")
    again = PipelineState.restore(msgspec.msgpack.decode(msgspec.msgpack.encode(state.snapshot()),
                                                         type=type(state.snapshot())), state.spec, 30)
    assert again.next_run_due() == state.next_run_due() == MONDAY + 21 * 86400


def test_a_slow_run_without_start_events_does_not_make_the_next_one_overdue_at_once():
    pipelines = Pipelines()
    spec = PipelineSpec("p", "data", "standard", 600, 3600, None, expected_interval_explicit=True)
    for i in range(20):  # every 10 minutes, 100 s each, finishes only (no STARTs)
        pipelines.apply(finish(f"r{i}", 10_000 + i * 600 + 100, duration=100.0), lambda name, team: spec)
    slow_finish = 10_000 + 20 * 600 + 900  # started on time, took 900 s: longer than its interval
    pipelines.apply(finish("slow", slow_finish, duration=900.0), lambda name, team: spec)
    state = pipelines.get("p")
    assert state.last_start_ts + 600 + 100 < slow_finish  # the start-based due lies before this finish ...
    assert state.next_run_due() == slow_finish + 300  # ... so half an interval after the finish counts


@pytest.fixture
def eight_duration_buckets():
    """--duration-buckets 15,60,300,900,1800,3600,10800,43200 (the default before stop 22) for one test."""
    from pipemon.model import state as state_module

    bounds = (15, 60, 300, 900, 1800, 3600, 10800, 43200)
    state_module.set_duration_buckets(bounds)
    state_module._rebinned_logged.clear()
    yield bounds
    state_module.set_duration_buckets(state_module.DEFAULT_DURATION_BUCKETS)


def test_a_checkpoint_counted_with_other_buckets_keeps_its_shared_bounds_cumulative_counts(
        caplog, eight_duration_buckets):
    from pipemon.model.state import LEGACY_DURATION_BUCKETS, rebin_counts

    bounds = eight_duration_buckets

    rng = random.Random(3)
    durations = [rng.lognormvariate(6, 1.5) for _ in range(500)]
    state, _ = apply_all([finish(f"r{i}", 1000.0 + i, duration=d) for i, d in enumerate(durations)])
    legacy = [0] * (len(LEGACY_DURATION_BUCKETS) + 1)
    for d in durations:
        legacy[bisect.bisect_left(LEGACY_DURATION_BUCKETS, d)] += 1
    # a checkpoint of an older version: counted with the 16 legacy bounds, which it did not save
    snap = msgspec.structs.replace(state.snapshot(), bucket_counts=legacy, duration_buckets=[])
    with caplog.at_level(logging.WARNING, logger="pipemon.model.state"):
        restored = [PipelineState.restore(snap, SPEC, 30).bucket_counts for _ in range(2)]
    moved = restored[0]
    assert sum(moved) == len(durations) and restored[1] == moved
    for i, bound in enumerate(bounds):
        counted, truly = sum(moved[:i + 1]), sum(1 for d in durations if d <= bound)
        if bound in LEGACY_DURATION_BUCKETS:  # exact where both sets of bounds have it: no `le` series goes down
            assert counted == truly
        else:  # elsewhere never more runs under a bound than there were
            assert counted <= truly
    assert len([r for r in caplog.records if "duration buckets" in r.message]) == 1  # logged once
    # saved with the bounds in force: kept as they are
    assert PipelineState.restore(state.snapshot(), SPEC, 30).bucket_counts == state.bucket_counts
    assert rebin_counts([1, 2, 3], None, bounds) == [0] * len(bounds) + [6]
    # to no bounds (the default since stop 22) and back: every run in +Inf, then +Inf still holds them all
    assert rebin_counts(moved, bounds, ()) == [len(durations)]
    assert rebin_counts([len(durations)], (), bounds) == [0] * len(bounds) + [len(durations)]


# The checkpoint layout of 7ecdb1c (stop 18): array_like, so these must stay the first fields, in this order.
STOP_18_FIELDS = (
    "name", "team", "runs_success", "runs_failure", "bucket_counts", "duration_sum", "duration_count",
    "records_total", "last_run_ts", "last_success_ts", "last_run_success", "last_run_duration", "last_run_records",
    "last_run_throughput", "consecutive_failures", "in_progress", "ring", "pending", "seen", "covers_seq",
    "history", "outcomes", "outcome_count", "last_failure_ts", "last_start_ts", "gaps", "starts_seen",
    "data_clock", "data_clock_at", "arrived", "abandoned", "last_abandoned", "runs_reverted", "hourly",
    "weekdays", "weekdays_week", "recent_ids", "recent_values", "last_run_failed_children",
)


def test_a_checkpoint_of_the_previous_layout_restores_with_every_field():
    from pipemon.model.state import Snapshot

    assert Snapshot.__struct_fields__[:len(STOP_18_FIELDS)] == STOP_18_FIELDS
    hourly = [finish(f"r{i}", 1000.0 + 300 * i, duration=10.0 + i % 7, records=100 + i) for i in range(400)]
    state, _ = apply_all([Start("p", "s1", 1000.0 + 300 * 401), *hourly])
    state.weekdays, state.weekdays_week = [31, 31], 7
    snap = state.snapshot()
    old = msgspec.msgpack.encode([getattr(snap, name) for name in STOP_18_FIELDS])  # what stop 18 wrote
    restored = PipelineState.restore(msgspec.msgpack.decode(old, type=Snapshot), SPEC, 30)
    for name in STOP_18_FIELDS:
        if name not in ("hourly", "history", "ring", "pending", "covers_seq"):
            assert getattr(restored.snapshot(), name) == getattr(snap, name), name
    assert restored.history.hourly_rows() == state.history.hourly_rows()
    assert restored.bucket_counts == state.bucket_counts


def _samples(text: str, metric: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('runs="')[1].split('"')[0]] = float(value)
    return found


def test_the_published_recent_run_figures_are_the_least_unusual_of_the_latest_runs():
    from pipemon.service.exposition import pipeline_blocks

    rng = random.Random(5)
    runs = [finish(f"r{i}", i * 60, duration=rng.lognormvariate(3, 0.2), records=rng.randint(900, 1100))
            for i in range(40)]
    runs += [finish("slow1", 2460, duration=90, records=300), finish("slow2", 2520, duration=60, records=0)]
    state, _ = apply_all(runs)
    text = b"".join(pipeline_blocks(state)).decode()
    judged = state.judgements()
    durations, records = judged.duration, judged.records
    z = _samples(text, "pipeline_recent_runs_min_duration_zscore")
    assert z.keys() == {"1", "2", "3"}
    for k in (1, 2, 3):
        assert math.isclose(z[str(k)], min(j.zscore for j in durations[:k]))
    assert math.isclose(_samples(text, "pipeline_recent_runs_min_duration_ratio")["2"],
                        min(durations[0].ratio, durations[1].ratio))
    assert _samples(text, "pipeline_recent_runs_max_records_ratio") == {"1": 0.0, "2": records[1].ratio}
    throughput = _samples(text, "pipeline_recent_runs_max_throughput_ratio")
    assert throughput["1"] == 0.0  # zero records
    assert math.isclose(throughput["2"], records[1].ratio / durations[1].ratio)
    # records per second against the 40 runs before slow1, in log space: median of the latest 30, σ from the
    # MAD of those or of all 40, the larger
    logs = [math.log(r.records / r.duration) for r in runs[:40]]
    center = statistics.median(logs[-30:])
    spread = 1.4826 * max(statistics.median(abs(x - center) for x in logs[-30:]),
                          statistics.median(abs(x - statistics.median(logs)) for x in logs))
    throughput_z = _samples(text, "pipeline_recent_runs_max_throughput_zscore")
    assert math.isclose(judged.throughput[1].zscore, (math.log(300 / 90) - center) / spread)
    assert throughput_z["1"] < -100  # zero records: far below any real throughput, yet a number
    assert math.isclose(throughput_z["2"], judged.throughput[1].zscore)


def test_a_throughput_drop_is_judged_against_the_pipelines_own_throughput_noise():
    """The same slow run (2.7 × the usual duration, 85% of the usual records: a third of the usual records per
    second, beyond 2.5σ of the duration) on a pipeline whose records and durations vary by ~30% each, and on a
    steady one: only the steady one's throughput is beyond 2.5σ of its own (the noisy one's records per second
    vary more than its durations)."""
    def pipeline(sigma: float, steady_records: bool) -> PipelineState:
        rng = random.Random(11)
        runs = [finish(f"r{i}", i * 3600, duration=60 * rng.lognormvariate(0, sigma),
                       records=1000 if steady_records else round(1000 * rng.lognormvariate(0, sigma)))
                for i in range(60)]
        state, _ = apply_all([*runs, finish("slow", 60 * 3600, duration=60 * 2.7, records=850)])
        return state

    noisy, steady = pipeline(0.3, steady_records=False), pipeline(0.1, steady_records=True)
    for state in (noisy, steady):  # what the alert asked before: half the throughput, slow beyond 2σ
        judged = state.judgements()
        assert judged.throughput_ratios()[0] < 0.5 and judged.duration[0].zscore > 2.5
    assert noisy.judgements().throughput[0].zscore > -2.5
    assert steady.judgements().throughput[0].zscore < -2.5


def test_the_least_unusual_figure_leaves_out_unjudged_runs_as_promql_min_and_max_do():
    from pipemon.model.baseline import NO_JUDGEMENT, Judgement
    from pipemon.model.state import RecentJudgements, least_unusual

    nan = float("nan")
    assert least_unusual([3.0, nan, 2.5], lowest=True) == 2.5
    assert least_unusual([nan, 0.2], lowest=False) == 0.2
    assert math.isnan(least_unusual([nan, nan], lowest=True))
    # records per second over the baseline's is IEEE division: a zero duration ratio gives +inf (0 records: NaN)
    judged = RecentJudgements((Judgement(1, 0.0, 1, 10), Judgement(1, 0.0, 1, 10), NO_JUDGEMENT),
                              (Judgement(1, 2.0, 1, 10), Judgement(1, 0.0, 1, 10), NO_JUDGEMENT),
                              (NO_JUDGEMENT,) * 3, "none", "none")
    ratios = judged.throughput_ratios()
    assert ratios[0] == math.inf and math.isnan(ratios[1]) and math.isnan(ratios[2])


@pytest.mark.parametrize("every", [600.0, 86400.0])
def test_a_run_in_progress_has_the_baseline_it_will_be_judged_against_when_it_succeeds(every):
    """Runs every 10 minutes (an hourly summary, tempered) or daily, with a weekend rhythm: the baseline
    published while a run is in progress is the one its finish is judged against, in its own seasonal slot."""
    rng = random.Random(7)
    records, t = [], 1_700_000_000.0
    for i in range(400 if every < 3600 else 60):
        weekend = int(t // 86400 + 3) % 7 >= 5
        duration = rng.lognormvariate(5.5 if weekend else 4.5, 0.1)
        records += [Start("p", f"r{i}", t), finish(f"r{i}", t + duration, duration=duration)]
        t += every
    state, _ = apply_all(records)
    assert math.isnan(state.running_baseline().expected)  # nothing in progress
    typical = state.judgements().duration[0].expected
    state, _ = apply_all([*records, Start("p", "now", t)])
    running = state.running_baseline()
    assert running.samples >= 10 and running.spread > 0
    state, _ = apply_all([*records, Start("p", "now", t), finish("now", t + typical, duration=typical)])
    judged = state.judgements().duration[0]
    assert math.isclose(running.expected, judged.expected) and math.isclose(running.spread, judged.spread)
    assert math.isclose(judged.zscore, math.log(typical / running.expected) / running.spread)


def _loads(n: int, every: float, idle, seed: int = 3) -> list[Finish]:
    """`n` successful runs `every` seconds: a real load (~1000 records, ~60 s) or, where idle(i, at), a quick
    no-op with zero records."""
    rng = random.Random(seed)
    runs = []
    for i in range(n):
        at = 1_700_000_000 + i * every
        if idle(i, at):
            runs.append(finish(f"r{i}", at, duration=6 * rng.lognormvariate(0, 0.1), records=0))
        else:
            runs.append(finish(f"r{i}", at, duration=60 * rng.lognormvariate(0, 0.2),
                               records=round(1000 * rng.lognormvariate(0, 0.1))))
    return runs


def test_idle_runs_of_a_pipeline_that_often_has_nothing_to_load_are_no_news():
    """One run in ten loads nothing (at random) and is quick: such a run gets no volume verdict and is judged
    for duration against the other idle runs, a real load against real loads, and a real drop is still one."""
    history = _loads(300, 300, lambda i, at: i % 10 == 3)
    end = history[-1].finished_at
    idle, _ = apply_all([*history, finish("idle", end + 300, duration=6.0, records=0)])
    judged = idle.judgements()
    assert math.isnan(judged.records[0].zscore) and math.isnan(judged.throughput[0].zscore)
    assert abs(judged.duration[0].zscore) < 1 and judged.duration[0].expected < 10
    slow_idle, _ = apply_all([*history, finish("slow idle", end + 300, duration=60.0, records=0)])
    assert slow_idle.judgements().duration[0].zscore == 0.0  # a no-op is never slow
    busy, _ = apply_all([*history, finish("busy", end + 300, duration=60.0, records=1000)])
    assert abs(busy.judgements().records[0].zscore) < 1 and abs(busy.judgements().duration[0].zscore) < 1
    drop, _ = apply_all([*history, finish("drop", end + 300, duration=60.0, records=150)])
    assert drop.judgements().records[0].zscore < -3


@pytest.mark.parametrize(("every", "pattern", "allowed"), [
    (10, (3,), 4),  # one idle run in ten, one at a time: chance makes 3 in a row of 300 runs; one more is allowed
    (50, (3, 4, 5, 6, 7), 6),  # as many, five in a row every 50 runs: its longest streak plus one
])
def test_a_pipeline_idle_for_longer_than_it_ever_was_is_told(every, pattern, allowed):
    """Zero-record runs in a row are no news up to one more than the longest streak before them, or than chance
    makes of the pipeline's share of them over its history; the next one is judged against the real loads."""
    history = _loads(300, 300, lambda i, at: i % every in pattern)
    end = history[-1].finished_at
    zeros = [finish(f"z{k}", end + 300 * (k + 1), duration=6.0, records=0) for k in range(allowed + 1)]
    state, _ = apply_all([*history, *zeros[:allowed]])
    assert math.isnan(state.judgements().records[0].zscore)
    state, _ = apply_all([*history, *zeros])
    assert state.judgements().records[0].zscore < -3


def test_one_earlier_zero_record_incident_does_not_make_zero_records_usual():
    """A daily pipeline that had one bad streak of two zero-record runs: that is one incident, not a habit,
    and its next zero-record run is judged as the first one was."""
    history = _loads(40, 86400, lambda i, at: i in (20, 21))
    state, _ = apply_all([*history, finish("zero", history[-1].finished_at + 86400, duration=6.0, records=0)])
    assert state.judgements().records[0].zscore < -3


def test_a_pipeline_idle_at_night_is_not_idle_at_noon():
    """An hourly load with nothing to do from 00:00 to 06:00: a zero-record run at night is no news, one in the
    afternoon is (its hour of the day never idled)."""
    history = _loads(330, 3600, lambda i, at: (at % 86400) / 3600 < 6)
    end = history[-1].finished_at  # 15:13 UTC

    def zero_at(hour: int) -> float:
        at = end + 3600
        while int((at % 86400) // 3600) != hour:
            at += 3600
        state, _ = apply_all([*history, finish("zero", at, duration=6.0, records=0)])
        return state.judgements().records[0].zscore

    assert math.isnan(zero_at(3))
    assert zero_at(17) < -3


@pytest.mark.parametrize("every_hours", [1, 2])  # 2: no hourly summary, the run's profile alone must see it
def test_the_no_ops_of_the_night_do_not_hide_the_afternoon_peak_of_the_loads(every_hours):
    """An hourly (or 2-hourly) weekday load starting at :58, idle in 70% of its night runs, whose runs take up
    to twice as long around 14:00: its daily rhythm is learned from the real loads. With the quick no-ops among
    them no profile explains enough of its runs (and 06:00 holds too few finishes to judge hour by hour: the
    no-ops of 05:58 finish before it), so its usual afternoon peak was slow (z 2.8 and 3.5 before the fix;
    the hourly one also has the hourly summary, which now leaves the no-ops out as well); 4x the peak still is."""
    rng = random.Random(5)

    def hour(at: float) -> float:
        return (at % 86400) / 3600

    def weekday(at: float) -> bool:
        return (at // 86400 + 3) % 7 < 5  # 1970-01-01 was a Thursday

    def peak(at: float) -> float:
        return 1 + 0.9 * math.exp(-((hour(at) - 14) / 2) ** 2)

    start, history = 1_700_000_000 - 1_700_000_000 % 3600 - 120, []
    while len(history) < 336:
        start += 3600 * every_hours
        if not weekday(start):
            continue
        if hour(start) < 6 and rng.random() < 0.7:
            duration, records = 6 * rng.lognormvariate(0, 0.1), 0
        else:
            duration = 150 * peak(start) * rng.lognormvariate(0, 0.08)
            records = round(1000 * rng.lognormvariate(0, 0.1))
        history.append(finish(f"r{len(history)}", start + duration, duration=duration, records=records))
    start += 3600
    while not (weekday(start) and 13 <= hour(start) < 15):
        start += 3600

    def zscore(duration: float) -> float:
        state, _ = apply_all([*history, finish("now", start + duration, duration=duration, records=1000)])
        return state.judgements().duration[0].zscore

    assert abs(zscore(150 * peak(start))) < 1.5
    assert zscore(600 * peak(start)) > 3
