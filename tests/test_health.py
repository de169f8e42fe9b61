"""The UI's health states (pipemon.model.health): the alert rules' definitions, at their thresholds."""

from __future__ import annotations

import pytest

from pipemon.model.events import Finish, Start
from pipemon.model.health import (
    FAILING,
    NEVER_RAN,
    OK,
    REGISTRY_SOURCE,
    SLOW,
    STALE,
    STUCK,
    THROUGHPUT_DROP,
    VOLUME_LOW,
    HealthJudge,
    packaged_rules_config,
)
from pipemon.model.registry import parse_registry
from pipemon.model.state import Pipelines
from pipemon.render.rules import load_config
from tests.conftest import REPO

NOW = 1_800_000_000.0
HOUR = 3600.0
REGISTRY = parse_registry("""
teams: {t: {}}
pipelines:
  - {match: hourly, team: t, expected_interval: 1h, max_runtime: 10m}
  - {match: scheduled, team: t, schedule: "0 * * * *", schedule_grace: 20m}
  - {match: strict, team: t, expected_interval: 1h, thresholds: {failed_runs_low: 2, stale_grace_factor: 3}}
""")


def judge(started: float = NOW - 10 * HOUR) -> HealthJudge:
    return HealthJudge(load_config(REPO / "rules" / "config.yaml"), started=started)


def pipelines_with(name: str, runs: list[tuple[bool, float, float, int]]) -> Pipelines:
    """Runs of (success, finished_at, duration, records)."""
    pipelines = Pipelines()
    spec = REGISTRY.lookup(name)
    for i, (success, finished, duration, records) in enumerate(runs):
        pipelines.apply(Finish(name, f"r{i}", success, finished, duration, records), lambda *_: spec)
    return pipelines


def hourly(count: int, last: float = NOW - 600, duration: float = 10.0, records: int = 1000) -> list:
    return [(True, last - HOUR * (count - 1 - i), duration * (1 + 0.03 * (i % 5)), records) for i in range(count)]


def test_the_packaged_rules_config_is_the_repositorys():
    assert packaged_rules_config() == load_config(REPO / "rules" / "config.yaml")


def test_never_ran_then_stale_once_an_interval_and_its_grace_passed_since_the_exporter_started():
    state = Pipelines().ensure(REGISTRY.lookup("hourly"))
    # stale_grace_factor 1.5: grace is half an interval after the interval
    assert judge(started=NOW - 1.49 * HOUR).judge(state, NOW).state == NEVER_RAN
    assert judge(started=NOW - 1.51 * HOUR).judge(state, NOW).state == STALE


def test_failing_counts_the_streak_and_becomes_critical_at_the_rules_threshold():
    runs = hourly(12, last=NOW - 5 * HOUR)
    runs += [(False, NOW - 4 * HOUR + 60 * i, 1.0, 0) for i in range(3)]
    pipelines = pipelines_with("hourly", runs[:-1])
    health = judge().judge(pipelines.get("hourly"), NOW - 3 * HOUR)
    assert (health.state, health.failures, health.critical) == (FAILING, 2, False)
    pipelines = pipelines_with("hourly", runs)
    health = judge().judge(pipelines.get("hourly"), NOW - 3 * HOUR)
    assert (health.state, health.failures, health.critical) == (FAILING, 3, True)  # consecutive_failures_critical


def test_a_registry_override_moves_the_threshold_and_says_where_it_comes_from():
    runs = [*hourly(5), (False, NOW - 60, 1.0, 0)]
    strict = pipelines_with("strict", runs).get("strict")
    assert judge().judge(strict, NOW).state == OK  # failed_runs_low: 2 for this one
    assert judge().threshold(strict, "failed_runs_low") == (2.0, REGISTRY_SOURCE)
    assert judge().threshold(strict, "min_runs") == (5.0, "rules/config.yaml")


def test_stale_after_the_interval_and_its_grace_and_not_while_a_run_is_in_progress():
    pipelines = pipelines_with("hourly", hourly(6, last=NOW))
    state = pipelines.get("hourly")
    due = state.next_run_due()
    assert judge().judge(state, due + 0.49 * HOUR).state == OK
    assert judge().judge(state, due + 0.51 * HOUR).state == STALE
    pipelines.apply(Start("hourly", "now", due + 0.5 * HOUR), lambda *_: REGISTRY.lookup("hourly"))
    assert judge().judge(state, due + 0.51 * HOUR).state == OK


def test_a_scheduled_pipeline_is_stale_after_its_schedule_grace():
    pipelines = pipelines_with("scheduled", [(True, 1_800_000_000.0 + 5, 5.0, 1)])  # started at a fire time
    state = pipelines.get("scheduled")
    due = state.next_run_due()
    assert judge().judge(state, due + 19 * 60).state == OK
    assert judge().judge(state, due + 21 * 60).state == STALE


def test_stuck_past_the_max_runtime():
    pipelines = pipelines_with("hourly", hourly(3, last=NOW - 300))
    pipelines.apply(Start("hourly", "long", NOW - 200), lambda *_: REGISTRY.lookup("hourly"))
    state = pipelines.get("hourly")
    assert judge().judge(state, NOW - 200 + 599).state == OK
    assert judge().judge(state, NOW - 200 + 601).state == STUCK


@pytest.mark.parametrize(("duration", "records", "expected"), [
    (10.0, 1000, OK),
    (80.0, 1000, SLOW),  # z-score over the medium threshold, 8 × the baseline
    (13.0, 1000, OK),  # 1.3 ×: under duration_ratio_min (1.5), however many σ
    (10.0, 10, VOLUME_LOW),
    (14.0, 600, THROUGHPUT_DROP),  # neither slow (1.4 ×) nor few (60 %), but 43 % of the records per second
])
def test_the_latest_runs_against_their_baselines(duration, records, expected):
    runs = hourly(14) + [(True, NOW - 300 + i, duration, records) for i in range(2)]  # the hourly class: 2 runs
    health = judge().judge(pipelines_with("hourly", runs).get("hourly"), NOW)
    assert health.state == expected, health


def test_no_verdict_before_the_latest_runs_baseline_holds_min_baseline_samples():
    def state_after(normal_runs: int) -> str:
        runs = hourly(normal_runs) + [(True, NOW - 300 + i, 80.0, 1000) for i in range(2)]
        return judge().judge(pipelines_with("hourly", runs).get("hourly"), NOW).state

    assert state_after(8) == OK  # the latest run's baseline: 8 runs and the first slow one, 9 < 10
    assert state_after(9) == SLOW


def test_facts_of_deleted_pipelines_are_dropped_once_many():
    pipelines = Pipelines()
    judged = judge()
    for i in range(1200):
        judged.judge(pipelines.ensure(REGISTRY.default_spec(f"p{i}")), NOW)
    for i in range(1000):
        pipelines.forget(f"p{i}")
    judged.prune(pipelines.by_name, len(pipelines))
    assert len(judged._facts) == 1200, "1,000 gone: not yet many"
    pipelines.forget("p1000")
    judged.prune(pipelines.by_name, len(pipelines))
    assert set(judged._facts) == {f"p{i}" for i in range(1001, 1200)}
