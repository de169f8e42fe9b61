"""A pipeline's health, judged by the exporter itself: the alert rules' definitions, in Python.

The rules (rules_render.py) decide in PromQL over the exporter's series; this module decides over the same
state those series are rendered from, with the same thresholds (rules/config.yaml, overridden per pipeline
by the registry) and the same schedule classes, so the web UI needs no Prometheus. One deliberate
difference: the rules let an alert about a finished run resolve after `finished_run_window` (to notify once);
here the condition stands until the next run, since a person asking "is it healthy?" wants the run's verdict.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipemon.model.state import PipelineState, least_unusual
from pipemon.render.rules import RulesConfig, ScheduleClass, load_config

# Worst first: the order of the overview.
FAILING, STUCK, STALE, THROUGHPUT_DROP, VOLUME_LOW, SLOW, NEVER_RAN, OK = (
    "failing", "stuck", "stale", "throughput_drop", "volume_low", "slow", "never_ran", "ok")
# A throughput drop comes after low volume and slow: either of those explains it, and is the more specific.
STATES: tuple[str, ...] = (FAILING, STUCK, STALE, VOLUME_LOW, SLOW, THROUGHPUT_DROP, NEVER_RAN, OK)
LABELS = {FAILING: "failing", STUCK: "stuck", STALE: "stale", THROUGHPUT_DROP: "throughput drop",
          VOLUME_LOW: "low volume", SLOW: "slow", NEVER_RAN: "never ran", OK: "ok"}
RANK = {state: index for index, state in enumerate(STATES)}
DEFAULT_SOURCE = "rules/config.yaml"
REGISTRY_SOURCE = "registry"


def packaged_rules_config() -> RulesConfig:
    """The rules config shipped with the package (a link to the repository's rules/config.yaml)."""
    with resources.as_file(resources.files("pipemon") / "rules_config.yaml") as path:
        return load_config(path)


@dataclass(frozen=True, slots=True)
class Health:
    state: str  # the worst condition, or ok / never_ran
    conditions: tuple[str, ...]  # every condition that holds, worst first
    failures: int  # failed runs in a row
    critical: bool  # the failure streak is PipelineConsecutiveFailures' (critical), not PipelineRunFailed's

    @property
    def rank(self) -> int:
        return RANK[self.state]


@dataclass(frozen=True, slots=True)
class _Facts:
    """What does not change with the clock, cached per state version."""

    key: tuple[int, int, int]
    due: float
    interval: float
    grace: float
    judged: tuple[str, ...]  # slow / volume / throughput conditions of the latest runs


class HealthJudge:
    """Judges pipelines against the rules config; caches the clock-free part per pipeline state version."""

    def __init__(self, config: RulesConfig, source: str = DEFAULT_SOURCE, started: float = 0.0) -> None:
        self.config = config
        self.source = source
        self.started = started  # the exporter's start: a pipeline that never ran is timed from it
        self._facts: dict[str, _Facts] = {}

    @classmethod
    def from_path(cls, path: Path | None, started: float) -> HealthJudge:
        if path is None:
            return cls(packaged_rules_config(), DEFAULT_SOURCE, started)
        return cls(load_config(path), str(path), started)

    def threshold(self, state: PipelineState, name: str) -> tuple[float, str]:
        """A threshold in force for the pipeline and where it comes from."""
        override = state.spec.thresholds.get(name)
        if override is not None:
            return override, REGISTRY_SOURCE
        return float(self.config.thresholds[name]), self.source

    def schedule_class(self, interval: float) -> ScheduleClass:
        return next(c for c in self.config.schedule_classes if interval >= c.seconds)

    def success_window(self, state: PipelineState) -> int:
        return self.schedule_class(state.expected_interval()).success_window

    def judge(self, state: PipelineState, now: float) -> Health:
        facts = self.prepare(state)
        t = self._value
        conditions: list[str] = []
        failures = state.consecutive_failures
        critical = False
        low_at = max(t(state, "failed_runs_low"), self.schedule_class(facts.interval).failed_runs_low_at_least)
        if failures >= low_at:
            conditions.append(FAILING)
            critical = failures >= t(state, "consecutive_failures_critical") or (
                failures >= 2 and state.last_success_ts > 0
                and now - state.last_success_ts >= t(state, "failing_seconds_critical"))
        oldest = state.oldest_start()
        if oldest > 0 and now - oldest > state.spec.max_runtime_seconds:
            conditions.append(STUCK)
        overdue = now - facts.due if facts.due > 0 else (now - self.started) - facts.interval
        if overdue > facts.grace and not state.in_progress:
            conditions.append(STALE)
        conditions.extend(facts.judged)
        if conditions:
            state_name = min(conditions, key=RANK.__getitem__)
        elif state.runs_success + state.runs_failure == 0:
            state_name = NEVER_RAN
        else:
            state_name = OK
        return Health(state_name, tuple(sorted(conditions, key=RANK.__getitem__)), failures, critical)

    def _value(self, state: PipelineState, name: str) -> float:
        return self.threshold(state, name)[0]

    def prepare(self, state: PipelineState) -> _Facts:
        """The clock-free part of the pipeline's judgement, from the cache while its state is unchanged."""
        key = (state.version, id(state.spec), id(state))  # a re-created state starts at 0 again
        facts = self._facts.get(state.name)
        if facts is None or facts.key != key:
            interval = state.expected_interval()
            grace = (state.spec.schedule_grace_seconds if state.spec.schedule
                     else interval * (self._value(state, "stale_grace_factor") - 1))
            facts = _Facts(key, state.next_run_due(), interval, grace, self._judged(state, interval))
            self._facts[state.name] = facts
        return facts

    def _judged(self, state: PipelineState, interval: float) -> tuple[str, ...]:
        """The conditions about the latest successful runs against their baselines (rules_render's
        duration_alerts, volume_alerts and throughput_alerts)."""
        judged = state.judgements()
        t = self._value
        if not state.last_run_success or judged.duration[0].samples < t(state, "min_baseline_samples"):
            return ()
        c = self.schedule_class(interval)
        high, medium = c.runs_high, c.runs_medium

        def lowest(values: list[float], runs: int) -> float:
            return least_unusual(values[:runs], lowest=True)

        def highest(values: list[float], runs: int) -> float:
            return least_unusual(values[:runs], lowest=False)

        # the figures the exporter publishes (pipeline_recent_runs_*): each required run beyond a threshold is
        # the least unusual of them beyond it; NaN compares false (no verdict)
        d_z = [d.zscore for d in judged.duration]
        r_z, r_ratio = [r.zscore for r in judged.records], [r.ratio for r in judged.records]
        found = []
        if (highest(judged.throughput_ratios(), high) < t(state, "throughput_ratio_high")
                and highest([j.zscore for j in judged.throughput], high) < -t(state, "throughput_zscore_high")
                and lowest(d_z, high) > t(state, "duration_zscore_medium")):
            found.append(THROUGHPUT_DROP)
        if (highest(r_z, high) < -t(state, "volume_zscore_high")
                and highest(r_ratio, high) <= t(state, "volume_ratio_high")):
            found.append(VOLUME_LOW)
        if (lowest(d_z, medium) > t(state, "duration_zscore_medium")
                and lowest([d.ratio for d in judged.duration], medium) >= t(state, "duration_ratio_min")):
            found.append(SLOW)
        return tuple(found)

    def is_prepared(self, state: PipelineState) -> bool:
        facts = self._facts.get(state.name)
        return facts is not None and facts.key == (state.version, id(state.spec), id(state))

    def prune(self, live: Container[str], count: int) -> None:
        """Drop the cached facts of deleted pipelines once they are many (`count`: pipelines tracked)."""
        if len(self._facts) > count + 1000:
            self._facts = {name: facts for name, facts in self._facts.items() if name in live}
