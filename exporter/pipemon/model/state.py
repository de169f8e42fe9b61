"""Per-pipeline state in plain Python objects, and the rules for applying run records to it.

Applying is deterministic: the same records in the same order give the same state, which is what lets
storage rebuild the state after a restart by replaying its log on top of the last checkpoint.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import msgspec

from pipemon.model import schedule
from pipemon.model.baseline import (
    MIN_DURATION_SPREAD_SECONDS,
    NO_JUDGEMENT,
    SPREAD_SAMPLES,
    Judgement,
    RunHistory,
    baseline_of,
    idle_runs_before,
    idle_streak,
    judge,
    log_duration,
    log_records,
    log_throughput,
    same_kind,
    slots_of,
    temper,
)
from pipemon.model.events import Abandon, Discard, Finish, Forget, Record, Start
from pipemon.model.recent import ABANDONED, FAILURE, RECENT_RUNS, SUCCESS, RecentRuns
from pipemon.model.registry import PipelineSpec

NAN = math.nan
# Each histogram bucket is a series per pipeline in Prometheus, and no rule or dashboard of pipemon reads one
# (the alerts judge each run against its own baseline), so by default only +Inf, _sum and _count: the runs
# and their mean duration. `--duration-buckets` adds bounds for histogram_quantile().
DEFAULT_DURATION_BUCKETS: tuple[float, ...] = ()
NO_BUCKETS = "none"  # `--duration-buckets` for no bounds
DURATION_BUCKETS: tuple[float, ...] = DEFAULT_DURATION_BUCKETS
# The default bounds before 44559f7: a checkpoint that did not save its bounds and has their bucket count.
LEGACY_DURATION_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
)
log = logging.getLogger("pipemon.model.state")
_rebinned_logged: set[tuple[tuple[float, ...] | None, tuple[float, ...]]] = set()


def parse_buckets(text: str) -> tuple[float, ...]:
    """`--duration-buckets`: comma-separated upper bounds in seconds, increasing, positive; or `none`."""
    if text.strip().lower() == NO_BUCKETS:
        return ()
    try:
        bounds = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"expected comma-separated seconds, got {text!r}") from exc
    if not bounds or bounds[0] <= 0 or list(bounds) != sorted(set(bounds)) or math.inf in bounds:
        raise ValueError(f"expected increasing positive finite seconds, or {NO_BUCKETS}, got {text!r}")
    return bounds


def format_buckets(bounds: tuple[float, ...]) -> str:
    """What parse_buckets reads back as `bounds`."""
    return ",".join(f"{b:g}" for b in bounds) or NO_BUCKETS


def set_duration_buckets(bounds: tuple[float, ...]) -> None:
    """The histogram's bounds for this process; set before any state is built or restored (a restored
    pipeline saved with other bounds has its counts moved into the new buckets: rebin_counts)."""
    global DURATION_BUCKETS
    DURATION_BUCKETS = tuple(bounds)
STARTED, FINISHED = 1, 2
JUDGED_RUNS = 3  # the latest successful runs judged against their baselines (alerts may want confirmation)
HIGH_CONFIRM_RUNS = 2  # the most runs a high-severity alert (and every records alert) may ask confirmation of
SUCCESS_WINDOWS = (10, 50)  # success ratios over this many latest runs
OUTCOME_BITS = max(SUCCESS_WINDOWS)
GAPS_KEPT = 16  # start-to-start gaps kept to learn a pipeline's interval ...
MIN_GAPS = 4  # ... and how many it needs first
# What an abandonment changed, to take it back when the run's finish arrives after all: its time (the run's
# start), whether it became the latest run, and the latest-run facts before it (time, success, duration,
# records, throughput, last success, the abandoned run id that held them or "").
Undo = tuple[float, bool, float, bool, float, float, float, float, str]


class Snapshot(msgspec.Struct, array_like=True):
    """The persisted form of a pipeline's state (checkpoints)."""

    name: str
    team: str
    runs_success: int
    runs_failure: int
    bucket_counts: list[int]
    duration_sum: float
    duration_count: int
    records_total: int
    last_run_ts: float
    last_success_ts: float
    last_run_success: bool
    last_run_duration: float
    last_run_records: float
    last_run_throughput: float
    consecutive_failures: int
    in_progress: dict[str, float]
    ring: list[tuple[float, float]]
    pending: tuple[float, float] | None
    seen: dict[str, int]
    covers_seq: int = 0  # the last log sequence applied to this state; replay skips up to it
    # Since the detection rework; `ring` and `pending` above are kept empty (older checkpoints still load).
    history: list[tuple[float, float, float]] = []  # successful runs: (finished at, duration, records)
    outcomes: int = 0  # bit i: the i-th latest run (in order) succeeded
    outcome_count: int = 0
    last_failure_ts: float = 0.0
    last_start_ts: float = 0.0  # start of the latest run (in order)
    gaps: list[float] = []  # start-to-start gaps of the latest runs
    starts_seen: bool = False  # the pipeline reports starts (so a due run shows up as soon as it starts)
    # Abandonment judged in the data's own time (issue 14); absent from older checkpoints.
    data_clock: float = 0.0
    data_clock_at: float = 0.0
    arrived: dict[str, float] = msgspec.field(default_factory=dict)
    abandoned: dict[str, Undo] = msgspec.field(default_factory=dict)
    last_abandoned: str = ""
    runs_reverted: int = 0
    hourly: list[tuple[int, float, float]] = []  # frequent pipelines' hourly summary (baseline.HourlySummary)
    weekdays: list[int] = []  # weekdays with runs started, per week (schedule.learn_weekday)
    weekdays_week: int = 0
    # The recent-runs ring (issue 15): run ids, and per run status, started, finished, duration, records.
    recent_ids: list[str] = []
    recent_values: list[float] = []
    last_run_failed_children: list[str] = []  # issue 13; absent from older checkpoints
    # Newer fields. array_like: a field is added at the end only, or older checkpoints no longer load.
    duration_buckets: list[float] = []  # the bounds bucket_counts were counted with; absent from older ones
    hourly_open: list[tuple[int, float, float]] = []  # the runs of the hour the hourly summary is collecting


class PipelineState:
    """Everything pipemon knows about one pipeline. `version` changes whenever an exported value does."""

    __slots__ = (
        "_judged", "_running", "abandoned", "arrived", "baseline_size", "bucket_counts", "consecutive_failures",
        "data_clock", "data_clock_at", "duration_count", "duration_sum", "gaps", "history", "in_progress",
        "last_abandoned", "last_failure_ts", "last_run_duration", "last_run_failed_children", "last_run_records",
        "last_run_success", "last_run_throughput", "last_run_ts", "last_start_ts", "last_success_ts", "name",
        "outcome_count", "outcomes", "recent", "records_total", "runs_failure", "runs_reverted", "runs_success",
        "seen", "spec", "starts_seen", "team", "version", "weekdays", "weekdays_week",
    )

    def __init__(self, spec: PipelineSpec, baseline_size: int, history_size: int = 336,
                 recent_runs: int = RECENT_RUNS) -> None:
        self.name = spec.name
        self.spec = spec
        self.team = spec.team
        self.version = 0
        self.runs_success = 0
        self.runs_failure = 0
        self.bucket_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.records_total = 0
        self.last_run_ts = 0.0
        self.last_success_ts = 0.0
        self.last_run_success = False
        self.last_run_duration = NAN
        self.last_run_records = NAN
        self.last_run_throughput = NAN
        self.consecutive_failures = 0
        self.in_progress: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        # Successful runs in order; each is judged against the runs before it, never against itself.
        self.baseline_size = baseline_size
        self.history = RunHistory(history_size)
        self._judged: tuple[int, RecentJudgements] | None = None  # cache, keyed by history.appended
        self._running: tuple[tuple[float, int], Judgement] | None = None  # cache, keyed by (start, appended)
        self.outcomes = 0
        self.outcome_count = 0
        self.last_failure_ts = 0.0
        self.last_start_ts = 0.0
        self.gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self.starts_seen = False
        self.weekdays: list[int] = []  # weekdays runs started on, per week, latest first (schedule.learn_weekday)
        self.weekdays_week = 0  # the week of weekdays[0]
        # The data's own clock: the newest event time applied, and when (wall clock) that event arrived.
        self.data_clock = 0.0
        self.data_clock_at = 0.0
        self.arrived: dict[str, float] = {}  # runs in progress whose START arrived late: its arrival
        self.abandoned: dict[str, Undo] = {}  # runs closed as abandoned, while their id is in `seen`
        self.last_abandoned = ""  # the abandoned run that is the latest run, if one is
        self.runs_reverted = 0  # abandonments taken back by the run's finish (a counter)
        self.recent = RecentRuns(recent_runs)  # the last runs of any outcome, for people (the web UI)
        self.last_run_failed_children: list[str] = []  # OpenLineage child jobs of the latest run that failed

    # ---- baselines -----------------------------------------------------------------------------------

    def judgements(self) -> RecentJudgements:
        """The latest JUDGED_RUNS successful runs (latest first), each against the runs before it."""
        key = self.history.appended
        if self._judged is None or self._judged[0] != key:
            # One new run since the last look: the older judgements stand, only the newest is made.
            reuse = self._judged[1] if self._judged is not None and self._judged[0] == key - 1 else None
            self._judged = (key, self._judge_recent(reuse))
        return self._judged[1]

    def _judge_recent(self, previous: RecentJudgements | None) -> RecentJudgements:
        history = self.history
        timestamps = history.ordered("ts")
        durations, records = history.ordered("duration"), history.ordered("records")
        d_profile = history.profile("duration", log_duration)
        r_profile = history.profile("records", log_records)
        throughputs = [_throughput_of(r, d) for d, r in zip(durations, records, strict=True)]
        duration: list[Judgement] = []
        volume: list[Judgement] = []
        throughput: list[Judgement] = []
        count = JUDGED_RUNS
        if previous is not None and (previous.duration_profile, previous.records_profile) == (d_profile, r_profile):
            count = 1
        slots = {profile: slots_of(timestamps, profile) for profile in {d_profile, r_profile}}
        runs = _Runs(timestamps, durations, records, throughputs)
        for index in range(len(timestamps) - 1, max(-1, len(timestamps) - 1 - count), -1):
            slow, low, rate = self._judge_run(runs, index, (d_profile, slots[d_profile]), (r_profile, slots[r_profile]))
            duration.append(slow)
            volume.append(low)
            throughput.append(rate)
        if count == 1 and previous is not None:
            duration += previous.duration[:JUDGED_RUNS - 1]
            volume += previous.records[:JUDGED_RUNS - 1]
            throughput += previous.throughput[:JUDGED_RUNS - 1]
        pad = [NO_JUDGEMENT] * (JUDGED_RUNS - len(duration))
        return RecentJudgements(tuple(duration + pad), tuple(volume + pad), tuple(throughput + pad), d_profile,
                                r_profile)

    def _judge_run(self, runs: _Runs, index: int, d_profile: tuple[str, Sequence[int | None]],
                   r_profile: tuple[str, Sequence[int | None]]) -> tuple[Judgement, Judgement, Judgement]:
        """The run at `index`: its duration, records and records per second against the runs before it."""
        ts, d, r, size = runs.timestamps[index], runs.durations[index], runs.records[index], self.baseline_size
        base = _Bases.of(runs.durations, runs.records, runs.throughputs, index, r_profile[1])
        slow = self._judge_duration(runs.timestamps, base.durations, index, *d_profile, d, not base.idle)
        if base.idle:  # a no-op is never "slow" (its time follows the source's size, not its health)
            slow = dataclasses.replace(slow, zscore=min(slow.zscore, 0.0), ratio=min(slow.ratio, 1.0))
        low = NO_JUDGEMENT if base.records is None else judge(
            baseline_of(runs.timestamps, base.records, index, SPREAD_SAMPLES, *r_profile), r, log_records,
            math.expm1, center_size=size)
        if self.history.hourly is not None:
            # few records: against the chosen profile's reference (a drop at a peak hour is still a drop)
            low = temper(low, r, self.history.hourly.reference("records", ts), log_records, math.expm1, -1)
        # records per second against its own spread, flat: a slow run of a noisy job has a low throughput too,
        # so its drop counts only when it is beyond the throughput's usual variation as well
        rate = NO_JUDGEMENT if base.throughputs is None else judge(
            baseline_of(runs.timestamps, base.throughputs, index, SPREAD_SAMPLES, "none"), runs.throughputs[index],
            log_throughput, math.exp, center_size=size)
        return slow, low, rate

    def _judge_duration(self, timestamps: Sequence[float], durations: Sequence[float], index: int, profile: str,
                        slots: Sequence[int | None] | None, duration: float, summarised: bool = True) -> Judgement:
        """The duration of the run at `index` against the runs before it in its slot; with an hourly summary
        (`summarised`: the run is of the kind the summary holds, not an idle one), only as slow as against the
        higher of the chosen profile's and the two-way (weekday + hour) reference."""
        judged = judge(baseline_of(timestamps, durations, index, SPREAD_SAMPLES, profile, slots), duration,
                       log_duration, math.exp, MIN_DURATION_SPREAD_SECONDS, self.baseline_size)
        hourly = self.history.hourly
        if hourly is not None and summarised:
            judged = temper(judged, duration, hourly.highest_reference("duration", timestamps[index]), log_duration,
                            math.exp, +1)
        return judged

    def running_baseline(self) -> Judgement:
        """The baseline the oldest run in progress will be judged against when it succeeds (its seasonal slot's
        median duration and log-space spread, tempered as a finished run's), so that the rules can tell from
        its age alone that it is already too slow; NO_JUDGEMENT when no run is in progress or none is known."""
        started = self.oldest_start()
        if not started:
            return NO_JUDGEMENT
        key = (started, self.history.appended)
        if self._running is None or self._running[0] != key:
            self._running = (key, self._baseline_at(started))
        return self._running[1]

    def _baseline_at(self, started: float) -> Judgement:
        history = self.history
        if not len(history):
            return NO_JUDGEMENT
        typical = self.judgements().duration[0].expected
        finish = started + (0.0 if math.isnan(typical) else typical)  # a run's slot is that of its finish
        timestamps = [*history.ordered("ts"), finish]
        durations, records = [*history.ordered("duration"), NAN], [*history.ordered("records"), NAN]
        if idle_runs_before(records, len(records) - 1)[0]:
            durations = same_kind(durations, records, idle=False)  # a run in progress is taken for a real load
        profile = history.profile("duration", log_duration)
        return self._judge_duration(timestamps, durations, len(timestamps) - 1, profile, None, 1.0)

    def success_ratio(self, window: int) -> float:
        """The share of successes among the latest `window` runs (fewer if fewer ran); NaN if none."""
        runs = min(window, self.outcome_count)
        if not runs:
            return NAN
        return (self.outcomes & ((1 << runs) - 1)).bit_count() / runs

    def expected_interval(self) -> float:
        """The registry's interval, else the median of the pipeline's own recent start-to-start gaps."""
        if self.spec.expected_interval_explicit or len(self.gaps) < MIN_GAPS:
            return self.spec.expected_interval_seconds
        return sorted(self.gaps)[len(self.gaps) // 2]

    def next_run_due(self) -> float:
        """When the next run should show up: the schedule's next fire after the latest start, else the
        latest start plus the expected interval; 0 if it never ran (the rules then count from the exporter's
        start). Without START events a run shows up when it finishes, so its typical duration is added."""
        if not self.last_start_ts:
            return 0.0
        if self.spec.schedule:
            # half an interval on: a run that started a little before its fire time is that fire's run
            tolerance = 0.5 * self.spec.expected_interval_seconds
            due = schedule.next_fire(self.spec.schedule, self.last_start_ts + tolerance)
        else:
            due = schedule.skip_quiet_days(self.weekdays, self.weekdays_week,
                                           self.last_start_ts + self.expected_interval())
        if not self.starts_seen:
            expected = self.judgements().duration[0].expected
            due += 0.0 if math.isnan(expected) else expected
            # a slower run moves its start back, not the next one's: a run that just finished is not followed
            # by an overdue one within half an interval
            due = max(due, self.last_run_ts + 0.5 * self.expected_interval())
        return due

    def oldest_start(self) -> float:
        return min(self.in_progress.values(), default=0.0)

    def run_start(self, run_id: str) -> float | None:
        """When a run in progress, or one closed as abandoned, started."""
        started = self.in_progress.get(run_id)
        if started is None and run_id in self.abandoned:
            started = self.abandoned[run_id][0]
        return started

    def overdue(self, now: float, limit: float) -> list[tuple[str, float]]:
        """Runs in progress whose finish can no longer be expected: (run id, start). Both clocks must have
        passed `limit` since the start: the data's (the newest event time, running on at wall-clock speed from
        that event's arrival, so a pipeline that went quiet still ages) and the wall clock since the START
        arrived (so a backlog replayed next to live traffic is not judged by the live events' time)."""
        data_now = self.data_clock + max(0.0, now - self.data_clock_at)
        return [(run_id, started) for run_id, started in self.in_progress.items()
                if data_now - started > limit and now - self.arrived.get(run_id, started) > limit]

    # ---- persistence ---------------------------------------------------------------------------------

    def snapshot(self, covers_seq: int = 0) -> Snapshot:
        """The persisted form; it shares this state's dicts (no copies of the dedup window), so encode it
        before the state changes again."""
        return Snapshot(
            self.name, self.team, self.runs_success, self.runs_failure, list(self.bucket_counts),
            self.duration_sum, self.duration_count, self.records_total, self.last_run_ts, self.last_success_ts,
            self.last_run_success, self.last_run_duration, self.last_run_records, self.last_run_throughput,
            self.consecutive_failures, self.in_progress, [], None, self.seen, covers_seq,
            self.history.to_rows(), self.outcomes, self.outcome_count, self.last_failure_ts, self.last_start_ts,
            list(self.gaps), self.starts_seen,
            data_clock=self.data_clock, data_clock_at=self.data_clock_at, arrived=self.arrived,
            abandoned=self.abandoned, last_abandoned=self.last_abandoned, runs_reverted=self.runs_reverted,
            hourly=self.history.hourly_rows(), hourly_open=self.history.hourly_open_rows(),
            weekdays=self.weekdays, weekdays_week=self.weekdays_week,
            recent_ids=self.recent.ids, recent_values=self.recent.values.tolist(),
            last_run_failed_children=self.last_run_failed_children, duration_buckets=list(DURATION_BUCKETS),
        )

    @classmethod
    def restore(cls, snap: Snapshot, spec: PipelineSpec, baseline_size: int,
                history_size: int = 336, recent_runs: int = RECENT_RUNS) -> PipelineState:
        state = cls(spec, baseline_size, history_size, recent_runs)
        for name in Snapshot.__struct_fields__:
            if name not in ("ring", "pending", "name", "covers_seq", "history", "gaps", "hourly", "hourly_open",
                            "recent_ids", "recent_values", "duration_buckets"):
                setattr(state, name, getattr(snap, name))
        state.recent = RecentRuns.from_lists(recent_runs, snap.recent_ids, snap.recent_values, state.seen)
        rows = snap.history or _rows_of_old_ring(snap)
        state.history = RunHistory.from_rows(history_size, rows, snap.hourly, snap.hourly_open)
        state.gaps.extend(snap.gaps)
        state.bucket_counts = rebin_counts(snap.bucket_counts, saved_bounds(snap), DURATION_BUCKETS)
        return state


def _rows_of_old_ring(snap: Snapshot) -> list[tuple[float, float, float]]:
    """A checkpoint from before the detection rework: (duration, throughput) samples without times."""
    samples = [*snap.ring, *([snap.pending] if snap.pending else [])]
    return [(NAN, d, t * d if not math.isnan(t) else NAN) for d, t in samples]


@dataclasses.dataclass(frozen=True, slots=True)
class _Runs:
    """A pipeline's successful runs in order, one column a field (as RunHistory.ordered gives them)."""

    timestamps: Sequence[float]
    durations: Sequence[float]
    records: Sequence[float]
    throughputs: Sequence[float]


@dataclasses.dataclass(frozen=True, slots=True)
class _Bases:
    """The values one run is judged against (NaN: left out; None: no verdict)."""

    durations: Sequence[float]
    records: Sequence[float] | None
    throughputs: Sequence[float] | None
    idle: bool  # a zero-record run of a pipeline that often has nothing to load

    @classmethod
    def of(cls, durations: Sequence[float], records: Sequence[float], throughputs: Sequence[float], index: int,
           slots: Sequence[int | None]) -> _Bases:
        """Every run before it; for a pipeline that often has nothing to load, its idle runs and its real loads
        apart, and an idle run's few records are no news unless it idles longer in a row than allowed."""
        usual, allowed = idle_runs_before(records, index, slots)
        if not usual:
            return cls(durations, records, throughputs, idle=False)
        idle = records[index] == 0
        if idle and idle_streak(records, index) <= allowed:
            return cls(same_kind(durations, records, True), None, None, idle=True)
        return cls(same_kind(durations, records, idle), same_kind(records, records, False),
                   same_kind(throughputs, records, False), idle)


class RecentJudgements(msgspec.Struct, frozen=True):
    """The latest successful runs (latest first) against their baselines, and the seasonal profiles used."""

    duration: tuple[Judgement, ...]
    records: tuple[Judgement, ...]
    throughput: tuple[Judgement, ...]  # records per second against the runs before, without seasonality
    duration_profile: str
    records_profile: str

    def throughput_ratios(self) -> list[float]:
        """Each run's records per second over its baseline's: records ratio / duration ratio."""
        return [_divide(r.ratio, d.ratio) for d, r in zip(self.duration, self.records, strict=True)]


def _divide(a: float, b: float) -> float:
    """a / b as IEEE 754 (and PromQL) divide: x / 0 is ±inf, 0 / 0 NaN."""
    if b == 0:
        return NAN if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def least_unusual(values: Sequence[float], lowest: bool) -> float:
    """The lowest (or highest) of some runs' figures, NaN ones left out, NaN if all are: "each of these runs
    is beyond a threshold" is this figure beyond it, as PromQL's min/max over the runs would say."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return NAN
    return min(known) if lowest else max(known)


class Pipelines:
    """All tracked pipelines; applies records and remembers recent run ids to make retries harmless."""

    def __init__(self, baseline_size: int = 30, dedup_window: int = 1000, history_size: int = 336,
                 recent_runs: int = RECENT_RUNS) -> None:
        self.baseline_size = baseline_size
        self.history_size = history_size
        self.recent_runs = recent_runs
        self.dedup_window = dedup_window
        self.by_name: dict[str, PipelineState] = {}
        self.dirty: set[str] = set()  # changed since the last checkpoint
        self.forgotten: set[str] = set()  # removed since the last checkpoint
        self.reverted = 0  # abandonments taken back since start-up (the exporter's own counter)

    def __len__(self) -> int:
        return len(self.by_name)

    def __iter__(self) -> Iterator[PipelineState]:
        return iter(self.by_name.values())

    def get(self, name: str) -> PipelineState | None:
        return self.by_name.get(name)

    def ensure(self, spec: PipelineSpec) -> PipelineState:
        state = self.by_name.get(spec.name)
        if state is None:
            state = self.by_name[spec.name] = PipelineState(spec, self.baseline_size, self.history_size,
                                                                   self.recent_runs)
            self.dirty.add(spec.name)
            self.forgotten.discard(spec.name)  # re-created after a delete: the checkpoint must keep it
        return state

    def seen(self, pipeline: str, run_id: str, phase: int) -> bool:
        """Whether a record of this phase (or a later one) for this run was applied already."""
        state = self.by_name.get(pipeline)
        return state is not None and state.seen.get(run_id, 0) >= phase

    def forget(self, name: str) -> bool:
        if self.by_name.pop(name, None) is None:
            return False
        self.forgotten.add(name)
        self.dirty.discard(name)
        return True

    def apply(self, record: Record, spec_for: Callable[[str, str | None], PipelineSpec]) -> str:
        """Apply one record; returns "accepted" or "duplicate".

        `spec_for(pipeline, team)` gives the spec of a pipeline seen for the first time.
        """
        if isinstance(record, Forget):
            return "accepted" if self.forget(record.pipeline) else "duplicate"
        state = self.by_name.get(record.pipeline)
        if state is None:
            state = self.ensure(spec_for(record.pipeline, getattr(record, "team", None)))
        if isinstance(record, Finish):
            outcome = self._finish(state, record)
        elif isinstance(record, Start):
            outcome = self._start(state, record)
        elif isinstance(record, Discard):
            outcome = self._discard(state, record)
        else:
            outcome = self._abandon(state, record)
        if outcome == "accepted":
            state.version += 1
            self.dirty.add(state.name)
        return outcome

    def _remember(self, state: PipelineState, run_id: str, phase: int) -> None:
        seen = state.seen
        seen.pop(run_id, None)  # re-insert: most recent last
        seen[run_id] = phase
        if len(seen) > self.dedup_window:
            oldest = next(iter(seen))
            del seen[oldest]
            state.abandoned.pop(oldest, None)  # forgotten: a finish of it now counts as a new run

    @staticmethod
    def _tick(state: PipelineState, event_time: float, received_at: float | None) -> None:
        """Advance the pipeline's data clock to a newer event time (None: it arrived at its own time)."""
        if event_time > state.data_clock:
            state.data_clock = event_time
            state.data_clock_at = event_time if received_at is None else max(received_at, event_time)

    def _start(self, state: PipelineState, rec: Start) -> str:
        if state.seen.get(rec.run_id, 0) >= STARTED:
            return "duplicate"
        self._remember(state, rec.run_id, STARTED)
        state.in_progress[rec.run_id] = rec.started_at
        state.starts_seen = True
        self._learn_start(state, rec.started_at)
        if rec.received_at is not None:
            state.arrived[rec.run_id] = rec.received_at
        self._tick(state, rec.started_at, rec.received_at)
        return "accepted"

    def _finish(self, state: PipelineState, rec: Finish) -> str:
        if state.seen.get(rec.run_id, 0) >= FINISHED:
            return "duplicate"
        self._remember(state, rec.run_id, FINISHED)
        started = state.in_progress.pop(rec.run_id, None)
        state.arrived.pop(rec.run_id, None)
        undo = state.abandoned.pop(rec.run_id, None)
        if undo is not None:  # closed as abandoned, and here is its finish after all: it replaces the abandonment
            self._revert_abandonment(state, rec.run_id, undo)
            state.recent.drop(rec.run_id, ABANDONED)
            started = undo[0]
        self._tick(state, rec.finished_at, rec.received_at)
        throughput = _throughput(rec.records, rec.duration)
        self._count(state, rec.success, rec.duration, rec.records)
        duration = NAN if rec.duration is None else rec.duration
        if started is None:
            started = rec.finished_at - duration  # NaN when the finish has no duration either
        state.recent.add(rec.run_id, SUCCESS if rec.success else FAILURE, started, rec.finished_at, duration,
                         NAN if rec.records is None else float(rec.records))
        # Out-of-order finishes count, but judging them or learning from them would judge history
        # against the future; baselines, streaks and the latest-run facts follow the runs in order.
        if rec.finished_at >= state.last_run_ts:
            state.last_abandoned = ""
            self._learn_run(state, rec)
            self._set_last_run(state, rec.success, rec.finished_at, rec.duration, rec.records, throughput)
            state.last_run_failed_children = list(rec.failed_children)
        return "accepted"

    def _discard(self, state: PipelineState, rec: Discard) -> str:
        """A run that ends without an outcome: out of the runs in progress, its id remembered as finished (a
        later COMPLETE or FAIL of the same run is a duplicate), nothing counted."""
        if state.seen.get(rec.run_id, 0) >= FINISHED:
            return "duplicate"
        self._remember(state, rec.run_id, FINISHED)
        state.in_progress.pop(rec.run_id, None)
        state.arrived.pop(rec.run_id, None)
        undo = state.abandoned.pop(rec.run_id, None)
        if undo is not None:  # abandoned meanwhile: that failure is taken back, this run had no outcome
            self._revert_abandonment(state, rec.run_id, undo)
            state.recent.drop(rec.run_id, ABANDONED)
        self._tick(state, rec.at, None)
        return "accepted"

    def _abandon(self, state: PipelineState, rec: Abandon) -> str:
        started = state.in_progress.pop(rec.run_id, None)
        if started is None:
            return "duplicate"
        state.arrived.pop(rec.run_id, None)
        # Still only STARTED: its finish may arrive after all and replace the abandonment; a retried START
        # stays a duplicate.
        self._remember(state, rec.run_id, STARTED)
        at = min(rec.at, started)  # the run's own time, never the sweep's
        in_order = at >= state.last_run_ts
        state.abandoned[rec.run_id] = (
            at, in_order, state.last_run_ts, state.last_run_success, state.last_run_duration,
            state.last_run_records, state.last_run_throughput, state.last_success_ts, state.last_abandoned,
        )
        self._count(state, False, None, None)
        state.recent.add(rec.run_id, ABANDONED, started, max(rec.at, started), NAN, NAN)
        if in_order:  # the latest run now; the baselines are left alone (the next run moves them as before)
            state.last_run_ts, state.last_run_success = at, False
            state.last_run_duration = state.last_run_records = state.last_run_throughput = NAN
            state.consecutive_failures += 1
            state.last_abandoned = rec.run_id
            state.last_run_failed_children = []
        return "accepted"

    def _revert_abandonment(self, state: PipelineState, run_id: str, undo: Undo) -> None:
        """Take an abandonment back: its failure, its place in the failure streak and, while it is the latest
        run, the latest-run facts (those from before it return; the finish is applied after this)."""
        _at, in_order, *before, last_success_before, holder_before = undo
        state.runs_failure -= 1
        state.runs_reverted += 1
        self.reverted += 1
        if not in_order:
            return
        if state.last_success_ts == last_success_before and state.consecutive_failures > 0:
            state.consecutive_failures -= 1  # no success since it: it is still one of the streak
        if state.last_abandoned == run_id:
            (state.last_run_ts, state.last_run_success, state.last_run_duration, state.last_run_records,
             state.last_run_throughput) = before
            state.last_abandoned = holder_before if holder_before in state.abandoned else ""
        for other, entry in state.abandoned.items():  # an abandonment that came after it: skip it in its chain
            if entry[8] == run_id:
                state.abandoned[other] = (*entry[:2], *undo[2:])

    @staticmethod
    def _count(state: PipelineState, success: bool, duration: float | None, records: int | None) -> None:
        if success:
            state.runs_success += 1
        else:
            state.runs_failure += 1
        if duration is not None:
            state.bucket_counts[_bucket_index(duration)] += 1
            state.duration_sum += duration
            state.duration_count += 1
        if records is not None:
            state.records_total += records

    @staticmethod
    def _learn_start(state: PipelineState, started: float) -> None:
        """A run's start is activity (a pipeline that starts runs is not stale) and a gap to learn from."""
        if started <= state.last_start_ts:
            return  # a late START of an older run
        gap = started - state.last_start_ts
        # A gap far below the learned interval is a retry or a backfill burst, not the schedule.
        if state.last_start_ts and (len(state.gaps) < MIN_GAPS or gap >= state.expected_interval() / 10):
            state.gaps.append(gap)
        state.last_start_ts = started
        state.weekdays, state.weekdays_week = schedule.learn_weekday(state.weekdays, state.weekdays_week, started)

    @staticmethod
    def _learn_outcome(state: PipelineState, success: bool) -> None:
        state.outcomes = ((state.outcomes << 1) | int(success)) & ((1 << OUTCOME_BITS) - 1)
        state.outcome_count = min(state.outcome_count + 1, OUTCOME_BITS)

    @staticmethod
    def _learn_run(state: PipelineState, rec: Finish) -> None:
        """What a run in order teaches: its outcome, its start-to-start gap, and (a success) its baseline
        sample."""
        Pipelines._learn_outcome(state, rec.success)
        started = rec.finished_at - (rec.duration or 0.0)
        if started > state.last_start_ts + 1:  # else its START told already
            Pipelines._learn_start(state, started)
        if rec.success and rec.duration is not None:  # a COMPLETE without START has no duration to learn
            records = NAN if rec.records is None else float(rec.records)
            state.history.append(rec.finished_at, rec.duration, records)

    @staticmethod
    def _set_last_run(state: PipelineState, success: bool, at: float, duration: float | None,
                      records: int | None, throughput: float) -> None:
        state.last_run_ts = at
        state.last_run_success = success
        state.last_run_duration = NAN if duration is None else duration
        state.last_run_records = NAN if records is None else float(records)
        state.last_run_throughput = throughput
        if success:
            state.last_success_ts = at
            state.consecutive_failures = 0
        else:
            state.last_failure_ts = at
            state.consecutive_failures += 1


def _throughput(records: int | None, duration: float | None) -> float:
    if records is None or duration is None:
        return NAN
    return _throughput_of(float(records), duration)


def _throughput_of(records: float, duration: float) -> float:
    """Records per second of a run in the history (NaN: unknown records or duration)."""
    if math.isnan(duration):
        return NAN
    if duration > 0:
        return records / duration  # NaN records stay NaN
    return 0.0 if records == 0 else NAN


def saved_bounds(snap: Snapshot) -> tuple[float, ...] | None:
    """The bounds a checkpoint's histogram was counted with; None when they cannot be known."""
    if snap.duration_buckets:
        return tuple(snap.duration_buckets)
    if len(snap.bucket_counts) == len(DURATION_BUCKETS) + 1:  # as many as now: most likely the same
        return DURATION_BUCKETS
    return LEGACY_DURATION_BUCKETS if len(snap.bucket_counts) == len(LEGACY_DURATION_BUCKETS) + 1 else None


def rebin_counts(counts: list[int], saved: tuple[float, ...] | None, bounds: tuple[float, ...]) -> list[int]:
    """Per-bucket counts (the last one +Inf) moved from the saved bounds to `bounds`: each saved bucket into the
    first new one whose bound is at least its own. A bound both sets share keeps its cumulative count, so no
    `le` series Prometheus knows goes down; a run is never counted faster than it was. Unknown saved bounds:
    every run in +Inf. Logged once per change of bounds."""
    if saved == bounds:
        return list(counts)
    if (saved, bounds) not in _rebinned_logged:
        _rebinned_logged.add((saved, bounds))
        log.warning("checkpoints counted with duration buckets %s are moved into the buckets in force %s"
                    " (--duration-buckets); bounds they do not share get approximate counts, unknown bounds"
                    " put every run in +Inf", saved or "unknown", bounds)
    moved = [0] * (len(bounds) + 1)
    if saved is None:
        moved[-1] = sum(counts)
        return moved
    for index, count in enumerate(counts):
        upper = saved[index] if index < len(saved) else math.inf
        moved[bisect.bisect_left(bounds, upper) if upper != math.inf else len(bounds)] += count
    return moved


def _bucket_index(duration: float) -> int:
    """The first bucket whose bound is >= duration (NaN: the +Inf bucket)."""
    if duration != duration:
        return len(DURATION_BUCKETS)
    return bisect.bisect_left(DURATION_BUCKETS, duration)
