"""Run events: the wire format of the ingest API, and the normalised records that are stored and applied.

Wire events are validated by msgspec (types, ranges, patterns); cross-field rules live in `to_record`.
Records are what the state machine applies and what the storage log keeps, so replaying the log after a
restart rebuilds exactly the state that was acknowledged.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from pipemon.model.registry import PIPELINE_NAME_MAX, PIPELINE_NAME_PATTERN, TEAM_NAME_PATTERN

MAX_DURATION_SECONDS = 366 * 86400.0
MAX_RECORDS = 2**53  # exact in a float64 sample value

PipelineName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=PIPELINE_NAME_MAX, pattern=PIPELINE_NAME_PATTERN)
]
RunId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=PIPELINE_NAME_PATTERN)]
TeamName = Annotated[str, msgspec.Meta(pattern=TEAM_NAME_PATTERN)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_DURATION_SECONDS)]
Records = Annotated[int, msgspec.Meta(ge=0, le=MAX_RECORDS)]


class InvalidEvent(ValueError):
    """A well-typed event that breaks a cross-field rule; `field` names the offending field."""

    def __init__(self, field: str, message: str, reason: str = "invalid_field") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


# ---- wire format -------------------------------------------------------------------------------------


class RunFinished(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/runs`: one finished run."""

    pipeline: PipelineName
    run_id: RunId
    status: Literal["success", "failure"]
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    duration_seconds: Seconds | None = None
    records_processed: Records | None = None
    team: TeamName | None = None


class RunStarted(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/runs/start`: a run in progress."""

    pipeline: PipelineName
    run_id: RunId
    started_at: Timestamp | None = None
    team: TeamName | None = None


# Batches are decoded at once into these subclasses, which check the names' lengths but not their pattern
# (a regex call per field is most of the decoding cost); `unchecked_names` then checks the pattern's rule for
# the whole batch in one call. A batch that breaks it is decoded again item by item with the full types.
UncheckedName = Annotated[str, msgspec.Meta(min_length=1, max_length=PIPELINE_NAME_MAX)]
UncheckedRunId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")  # what PIPELINE_NAME_PATTERN excludes


class _RunFinishedBatchItem(RunFinished, forbid_unknown_fields=True):
    pipeline: UncheckedName
    run_id: UncheckedRunId


class _RunStartedBatchItem(RunStarted, forbid_unknown_fields=True):
    pipeline: UncheckedName
    run_id: UncheckedRunId


BATCH_ITEM_TYPES: dict[type, type] = {RunFinished: _RunFinishedBatchItem, RunStarted: _RunStartedBatchItem}


def names_match_pattern(events: list[RunFinished] | list[RunStarted]) -> bool:
    """Whether every pipeline and run id of decoded batch items obeys PIPELINE_NAME_PATTERN."""
    return _CONTROL_CHARACTER.search("".join([e.pipeline + e.run_id for e in events])) is None


# ---- stored records ----------------------------------------------------------------------------------


class Finish(msgspec.Struct, array_like=True, tag="f", frozen=True):
    pipeline: str
    run_id: str
    success: bool
    finished_at: float
    duration: float | None
    records: int | None
    team: str | None = None  # for pipelines the registry does not know: the team the event names
    received_at: float | None = None  # when it arrived, if later than its own time (see `received`)
    failed_children: tuple[str, ...] = ()  # OpenLineage: child jobs of this run that failed for good


class Start(msgspec.Struct, array_like=True, tag="s", frozen=True):
    pipeline: str
    run_id: str
    started_at: float
    team: str | None = None
    received_at: float | None = None  # when it arrived, if later than its own time (see `received`)


class Abandon(msgspec.Struct, array_like=True, tag="a", frozen=True):
    """A run that started and never finished within its allowance: counted as a failure, at its start time
    (records written before that carry the sweep's wall clock; applying takes the earlier of the two)."""

    pipeline: str
    run_id: str
    at: float


class Discard(msgspec.Struct, array_like=True, tag="d", frozen=True):
    """A run that ended without an outcome of its own: an Airflow task try that will be retried, a child job
    skipped (OpenLineage ABORT). It leaves the runs in progress and counts neither as success nor as failure."""

    pipeline: str
    run_id: str
    at: float


class Forget(msgspec.Struct, array_like=True, tag="x", frozen=True):
    """An admin removed a pipeline's state."""

    pipeline: str


Record = Finish | Start | Abandon | Discard | Forget
RECORD_ENCODER = msgspec.msgpack.Encoder()
RECORD_DECODER = msgspec.msgpack.Decoder(Record)
LATE_AFTER = 1.0  # seconds: a record that arrives later than this after its own time carries its arrival


def received(event_time: float, now: float) -> float | None:
    """The arrival time to store with a record: `now` when it is late (a replayed spool, a backlog), None when
    it arrived at about its own time (live traffic stays as small in the log as before)."""
    return now if now - event_time > LATE_AFTER else None


def finished_record(event: RunFinished, now: float, max_skew: float) -> Finish:
    """Normalise a finished-run event; raises InvalidEvent for contradictions and future timestamps."""
    finished = _epoch(event.finished_at, "finished_at", now, max_skew) if event.finished_at else now
    duration = event.duration_seconds
    if event.started_at is not None:
        started = _epoch(event.started_at, "started_at", now, max_skew)
        if started > finished:
            raise InvalidEvent("started_at", "started_at is later than finished_at")
        if duration is None:
            duration = finished - started
    if duration is None:
        raise InvalidEvent("duration_seconds", "give duration_seconds, or started_at (and finished_at)")
    return Finish(event.pipeline, event.run_id, event.status == "success", finished, duration,
                  event.records_processed, event.team, received(finished, now))


def started_record(event: RunStarted, now: float, max_skew: float) -> Start:
    started = _epoch(event.started_at, "started_at", now, max_skew) if event.started_at else now
    return Start(event.pipeline, event.run_id, started, event.team, received(started, now))


def _epoch(value: datetime, field: str, now: float, max_skew: float) -> float:
    ts = value.timestamp()
    if ts > now + max_skew:
        raise InvalidEvent(field, f"{field} is {ts - now:.0f}s in the future (clock skew allowed: {max_skew:.0f}s)",
                           reason="future_timestamp")
    if ts < 0 or math.isnan(ts):
        raise InvalidEvent(field, f"{field} is before 1970")
    return ts
