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


class PipelineState:
    """Everything pipemon knows about one pipeline. `version` changes whenever an exported value does."""

    __slots__ = (
        "bucket_counts", "consecutive_failures", "duration_count", "duration_sum", "in_progress",
        "last_run_duration", "last_run_records", "last_run_success", "last_run_throughput", "last_run_ts",
        "last_success_ts", "name", "pending", "records_total", "ring", "runs_failure", "runs_success", "seen",
        "spec", "team", "version",
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

    # ---- baselines -----------------------------------------------------------------------------------

    def duration_baseline(self) -> tuple[float, float]:
        return _mean_stddev([d for d, _ in self.ring])

    def throughput_baseline(self) -> tuple[float, float]:
        return _mean_stddev([t for _, t in self.ring if not math.isnan(t)])

    def oldest_start(self) -> float:
        return min(self.in_progress.values(), default=0.0)

    # ---- persistence ---------------------------------------------------------------------------------

    def snapshot(self, covers_seq: int = 0) -> Snapshot:
        """The persisted form; it shares this state's dicts (no copies of the dedup window), so encode it
        before the state changes again."""
        return Snapshot(
            self.name, self.team, self.runs_success, self.runs_failure, list(self.bucket_counts),
            self.duration_sum, self.duration_count, self.records_total, self.last_run_ts, self.last_success_ts,
            self.last_run_success, self.last_run_duration, self.last_run_records, self.last_run_throughput,
            self.consecutive_failures, self.in_progress, list(self.ring), self.pending, self.seen, covers_seq,
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
            del seen[next(iter(seen))]

    def _start(self, state: PipelineState, rec: Start) -> str:
        if state.seen.get(rec.run_id, 0) >= STARTED:
            return "duplicate"
        self._remember(state, rec.run_id, STARTED)
        state.in_progress[rec.run_id] = rec.started_at
        return "accepted"

    def _finish(self, state: PipelineState, rec: Finish) -> str:
        if state.seen.get(rec.run_id, 0) >= FINISHED:
            return "duplicate"
        self._remember(state, rec.run_id, FINISHED)
        state.in_progress.pop(rec.run_id, None)
        throughput = _throughput(rec.records, rec.duration)
        self._count(state, rec.success, rec.duration, rec.records)
        in_order = rec.finished_at >= state.last_run_ts
        if rec.success:
            self._add_baseline_sample(state, (rec.duration, throughput), in_order)
        if in_order:
            self._set_last_run(state, rec.success, rec.finished_at, rec.duration, rec.records, throughput)
        return "accepted"

    def _abandon(self, state: PipelineState, rec: Abandon) -> str:
        if state.in_progress.pop(rec.run_id, None) is None:
            return "duplicate"
        self._remember(state, rec.run_id, FINISHED)
        self._count(state, False, None, None)
        if rec.at >= state.last_run_ts:
            self._set_last_run(state, False, rec.at, None, None, NAN)
        return "accepted"

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
