"""OpenLineage `RunEvent`s (`POST /api/v1/lineage`): the wire format, and their translation into run records.

Only the fields pipemon uses are declared; OpenLineage events carry many more facets, which are ignored.
START becomes a `Start`; COMPLETE a successful `Finish`; FAIL and ABORT a failed one; RUNNING and OTHER are
acknowledged and change nothing. The duration is the terminal event's `eventTime` minus the START's, taken
from the run in progress (or from a START earlier in the same request); without a START the run still counts,
without a duration sample. Deduplication is the state's: one start and one finish per (pipeline, run id), so a
repeated event, a START after the run finished, or a second terminal event (COMPLETE then FAIL) are duplicates.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

from pipemon.events import (
    MAX_RECORDS,
    Finish,
    InvalidEvent,
    PipelineName,
    Records,
    RunId,
    Start,
    Timestamp,
    _epoch,
    received,
)
from pipemon.registry import PIPELINE_NAME_MAX, PIPELINE_NAME_PATTERN, Registry
from pipemon.state import Pipelines

log = logging.getLogger("pipemon.lineage")
DEFAULT_NAME_TEMPLATE = "{name}"
TEAM_PREFIX = "team:"
Namespace = Annotated[str, msgspec.Meta(min_length=1, max_length=PIPELINE_NAME_MAX, pattern=PIPELINE_NAME_PATTERN)]


# ---- wire format: the subset of the OpenLineage RunEvent that pipemon reads (camelCase as on the wire) ---


class Owner(msgspec.Struct):
    name: str


class OwnershipFacet(msgspec.Struct):
    owners: list[Owner] = []


class JobFacets(msgspec.Struct):
    ownership: OwnershipFacet | None = None


class Job(msgspec.Struct):
    namespace: Namespace
    name: PipelineName
    facets: JobFacets | None = None


class Run(msgspec.Struct):
    runId: RunId


class OutputStatistics(msgspec.Struct):
    rowCount: Records | None = None


class OutputFacets(msgspec.Struct):
    outputStatistics: OutputStatistics | None = None


class OutputDataset(msgspec.Struct):
    outputFacets: OutputFacets | None = None


class RunEvent(msgspec.Struct):
    eventType: Literal["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]
    eventTime: Timestamp
    run: Run
    job: Job
    outputs: list[OutputDataset] = []


TERMINAL = {"COMPLETE": True, "FAIL": False, "ABORT": False}  # event type -> success


# ---- translation -------------------------------------------------------------------------------------


def check_name_template(template: str) -> str:
    """Validate a pipeline name template such as `{namespace}/{name}`; raises ValueError."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise ValueError(f"invalid template {template!r}: {exc}") from exc
    if "name" not in fields or not fields <= {"name", "namespace"}:
        raise ValueError(f"template {template!r} must contain {{name}} and may contain {{namespace}}, nothing else")
    return template


class LineageConverter:
    """Turns the RunEvents of one request into records. One instance per request: it remembers the STARTs
    seen earlier in the same batch, which are not in the state yet."""

    def __init__(self, registry: Registry, pipelines: Pipelines, template: str, now: Callable[[], float],
                 max_skew: float) -> None:
        self.registry = registry
        self.pipelines = pipelines
        self.template = template
        self.now = now
        self.max_skew = max_skew
        self._batch_starts: dict[tuple[str, str], float] = {}

    def __call__(self, event: RunEvent) -> Start | Finish | None:
        pipeline = self.pipeline_name(event.job)
        now = self.now()
        at = _epoch(event.eventTime, "eventTime", now, self.max_skew)
        run_id = event.run.runId
        if event.eventType == "START":
            self._batch_starts.setdefault((pipeline, run_id), at)
            return Start(pipeline, run_id, at, self.team_hint(pipeline, event.job), received(at, now))
        if event.eventType not in TERMINAL:
            return None
        return Finish(pipeline, run_id, TERMINAL[event.eventType], at, self.duration(pipeline, run_id, at),
                      total_rows(event.outputs), self.team_hint(pipeline, event.job), received(at, now))

    def pipeline_name(self, job: Job) -> str:
        name = self.template.format(namespace=job.namespace, name=job.name)
        if len(name) > PIPELINE_NAME_MAX:
            raise InvalidEvent("job.name", f"the pipeline name {name[:40]!r}… is longer than {PIPELINE_NAME_MAX}")
        return name

    def duration(self, pipeline: str, run_id: str, finished: float) -> float | None:
        started = self._batch_starts.get((pipeline, run_id))
        if started is None:
            state = self.pipelines.get(pipeline)
            started = state.run_start(run_id) if state is not None else None
        if started is None:
            return None  # START lost or late: the run counts, without a duration sample
        if started > finished:
            log.warning("run %s of %s: terminal eventTime before START; no duration recorded", run_id, pipeline)
            return None
        return finished - started

    def team_hint(self, pipeline: str, job: Job) -> str | None:
        """The team the ownership facet names, for a pipeline the registry does not list and pipemon has not
        seen yet; None otherwise (the registry, or the team of the first event, decides)."""
        spec = self.registry.lookup(pipeline)
        if spec is None or spec.registered or self.pipelines.get(pipeline) is not None:
            return None
        facets = job.facets
        owners = facets.ownership.owners if facets is not None and facets.ownership is not None else []
        for owner in owners:
            team = owner.name.removeprefix(TEAM_PREFIX)
            if owner.name.startswith(TEAM_PREFIX) and team in self.registry.teams:
                return team
        return None


def total_rows(outputs: list[OutputDataset]) -> int | None:
    """The sum of `outputStatistics.rowCount` over the outputs; None when no output reports one."""
    counts = [o.outputFacets.outputStatistics.rowCount for o in outputs
              if o.outputFacets and o.outputFacets.outputStatistics
              and o.outputFacets.outputStatistics.rowCount is not None]
    if not counts:
        return None
    total = sum(counts)
    if total > MAX_RECORDS:
        raise InvalidEvent("outputs", f"the outputs' rowCount add up to more than {MAX_RECORDS}")
    return total
