"""Per-pipeline state in plain Python objects, and the rules for applying run records to it.

Applying is deterministic: the same records in the same order give the same state, which is what lets
storage rebuild the state after a restart by replaying its log on top of the last checkpoint.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator

import msgspec

from pipemon.events import Abandon, Finish, Forget, Record, Start
from pipemon.registry import PipelineSpec

NAN = math.nan
# Histogram buckets for batch work: seconds to a day.
DURATION_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
)
STARTED, FINISHED = 1, 2
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
    # Abandonment judged in the data's own time (issue 14); absent from older checkpoints.
    data_clock: float = 0.0
    data_clock_at: float = 0.0
    arrived: dict[str, float] = msgspec.field(default_factory=dict)
    abandoned: dict[str, Undo] = msgspec.field(default_factory=dict)
    last_abandoned: str = ""
    runs_reverted: int = 0


class PipelineState:
    """Everything pipemon knows about one pipeline. `version` changes whenever an exported value does."""

    __slots__ = (
        "abandoned", "arrived", "bucket_counts", "consecutive_failures", "data_clock", "data_clock_at",
        "duration_count", "duration_sum", "in_progress", "last_abandoned",
        "last_run_duration", "last_run_records", "last_run_success", "last_run_throughput", "last_run_ts",
        "last_success_ts", "name", "pending", "records_total", "ring", "runs_failure", "runs_reverted",
        "runs_success", "seen", "spec", "team", "version",
    )

    def __init__(self, spec: PipelineSpec, baseline_size: int) -> None:
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
        # Successful runs' (duration, throughput); the latest one waits in `pending` so that the
        # baseline never includes the run being judged.
        self.ring: deque[tuple[float, float]] = deque(maxlen=baseline_size)
        self.pending: tuple[float, float] | None = None
        self.seen: dict[str, int] = {}
        # The data's own clock: the newest event time applied, and when (wall clock) that event arrived.
        self.data_clock = 0.0
        self.data_clock_at = 0.0
        self.arrived: dict[str, float] = {}  # runs in progress whose START arrived late: its arrival
        self.abandoned: dict[str, Undo] = {}  # runs closed as abandoned, while their id is in `seen`
        self.last_abandoned = ""  # the abandoned run that is the latest run, if one is
        self.runs_reverted = 0  # abandonments taken back by the run's finish (a counter)

    # ---- baselines -----------------------------------------------------------------------------------

    def duration_baseline(self) -> tuple[float, float]:
        return _mean_stddev([d for d, _ in self.ring])

    def throughput_baseline(self) -> tuple[float, float]:
        return _mean_stddev([t for _, t in self.ring if not math.isnan(t)])

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
            self.consecutive_failures, self.in_progress, list(self.ring), self.pending, self.seen, covers_seq,
            data_clock=self.data_clock, data_clock_at=self.data_clock_at, arrived=self.arrived,
            abandoned=self.abandoned, last_abandoned=self.last_abandoned, runs_reverted=self.runs_reverted,
        )

    @classmethod
    def restore(cls, snap: Snapshot, spec: PipelineSpec, baseline_size: int) -> PipelineState:
        state = cls(spec, baseline_size)
        for name in Snapshot.__struct_fields__:
            if name not in ("ring", "name", "covers_seq"):
                setattr(state, name, getattr(snap, name))
        state.ring.extend(tuple(sample) for sample in snap.ring)
        state.pending = tuple(snap.pending) if snap.pending else None
        if len(state.bucket_counts) != len(DURATION_BUCKETS) + 1:  # buckets changed between versions
            state.bucket_counts = [0] * len(DURATION_BUCKETS) + [state.duration_count]
        return state


def _mean_stddev(values: list[float]) -> tuple[float, float]:
    if not values:
        return NAN, NAN
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(variance)


class Pipelines:
    """All tracked pipelines; applies records and remembers recent run ids to make retries harmless."""

    def __init__(self, baseline_size: int = 30, dedup_window: int = 1000) -> None:
        self.baseline_size = baseline_size
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
            state = self.by_name[spec.name] = PipelineState(spec, self.baseline_size)
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
        if rec.received_at is not None:
            state.arrived[rec.run_id] = rec.received_at
        self._tick(state, rec.started_at, rec.received_at)
        return "accepted"

    def _finish(self, state: PipelineState, rec: Finish) -> str:
        if state.seen.get(rec.run_id, 0) >= FINISHED:
            return "duplicate"
        self._remember(state, rec.run_id, FINISHED)
        state.in_progress.pop(rec.run_id, None)
        state.arrived.pop(rec.run_id, None)
        undo = state.abandoned.pop(rec.run_id, None)
        if undo is not None:  # closed as abandoned, and here is its finish after all: it replaces the abandonment
            self._revert_abandonment(state, rec.run_id, undo)
        self._tick(state, rec.finished_at, rec.received_at)
        throughput = _throughput(rec.records, rec.duration)
        self._count(state, rec.success, rec.duration, rec.records)
        in_order = rec.finished_at >= state.last_run_ts
        if rec.success:
            self._add_baseline_sample(state, (rec.duration, throughput), in_order)
        if in_order:
            state.last_abandoned = ""
            self._set_last_run(state, rec.success, rec.finished_at, rec.duration, rec.records, throughput)
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
        if in_order:  # the latest run now; the baselines are left alone (the next run moves them as before)
            state.last_run_ts, state.last_run_success = at, False
            state.last_run_duration = state.last_run_records = state.last_run_throughput = NAN
            state.consecutive_failures += 1
            state.last_abandoned = rec.run_id
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
    def _add_baseline_sample(state: PipelineState, sample: tuple[float, float], in_order: bool) -> None:
        if sample[0] is None:  # a success without a duration (OpenLineage COMPLETE without START)
            return
        if not in_order:
            state.ring.append(sample)
            return
        if state.pending is not None:
            state.ring.append(state.pending)
        state.pending = sample

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
            state.consecutive_failures += 1
            # The latest run is now a failure: the last success may join the baseline.
            if state.pending is not None:
                state.ring.append(state.pending)
                state.pending = None


def _throughput(records: int | None, duration: float | None) -> float:
    if records is None or duration is None:
        return NAN
    if duration > 0:
        return records / duration
    return 0.0 if records == 0 else NAN


def _bucket_index(duration: float) -> int:
    """The first bucket whose bound is >= duration (NaN: the +Inf bucket)."""
    if duration != duration:
        return len(DURATION_BUCKETS)
    return bisect.bisect_left(DURATION_BUCKETS, duration)
