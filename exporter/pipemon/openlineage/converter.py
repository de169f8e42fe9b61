"""OpenLineage `RunEvent`s (`POST /api/v1/lineage`): the wire format, and their translation into run records.

Only the fields pipemon uses are declared; OpenLineage events carry many more facets, which are ignored (the
facets read beyond the core are decoded leniently in `pipemon.openlineage.facets`).

A pipeline is a root run. An event whose `run.facets.parent` names a parent run in the same namespace is a
child run (an Airflow task, a dbt model, a Dagster step): it is folded into its root run (`pipemon.openlineage.
folding`) and answered `ignored` (reason `child_run`), unless the registry opts the child job in (an entry that
matches its name, or `track_children: true` on the root's). A child whose parent lives in another namespace (dbt-ol
started by an Airflow task) is a root.

START becomes a `Start`; COMPLETE a successful `Finish`; FAIL and ABORT a failed one; RUNNING and OTHER are
acknowledged and change nothing. A tracked child's FAIL that Airflow will retry, and its ABORT (a skipped dbt
model), become a `Discard`: out of the runs in progress, no outcome. The duration is the terminal event's
`eventTime` minus the START's, taken from the run in progress (or from a START earlier in the same request), else
from the terminal event's facets (Airflow's DAG run start date or duration, a task instance's duration); without
either the run still counts, without a duration sample. Deduplication is the state's: one start and one finish per
(pipeline, run id), so a repeated event, a START after the run finished, or a second terminal event (COMPLETE then
FAIL) are duplicates.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

from pipemon.model.events import (
    MAX_RECORDS,
    Discard,
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
from pipemon.model.registry import PIPELINE_NAME_MAX, PIPELINE_NAME_PATTERN, Registry
from pipemon.model.state import Pipelines
from pipemon.openlineage import facets as ol
from pipemon.openlineage.folding import Folds, FoldSession, RootKey
from pipemon.service.ingest import Ignored, Rejection

log = logging.getLogger("pipemon.openlineage.converter")
DEFAULT_NAME_TEMPLATE = "{name}"
Namespace = Annotated[str, msgspec.Meta(min_length=1, max_length=PIPELINE_NAME_MAX, pattern=PIPELINE_NAME_PATTERN)]


# ---- wire format: the subset of the OpenLineage RunEvent that pipemon reads (camelCase as on the wire) ---


class Job(msgspec.Struct):
    namespace: Namespace
    name: PipelineName
    facets: ol.RawFacets | None = None  # ownership (Airflow's DAG owner lands here too)


class Run(msgspec.Struct):
    runId: RunId
    facets: ol.RawFacets | None = None  # parent, airflowDagRun, airflow


class OutputStatistics(msgspec.Struct):
    rowCount: Records | None = None


class OutputFacets(msgspec.Struct):
    outputStatistics: OutputStatistics | None = None


class OutputDataset(msgspec.Struct):
    outputFacets: OutputFacets | None = None
    facets: ol.RawFacets | None = None  # ownership (dbt `meta.owner`)


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
    seen earlier in the same batch, which are not in the state yet. `folds` is this request's session of the
    folds that outlive requests (the caller commits it once the records are stored). `may_fold(root pipeline)`
    says whether a child event may add to its root run (raises a 403 rejection for another team's root)."""

    def __init__(self, registry: Registry, pipelines: Pipelines, template: str, now: Callable[[], float],
                 max_skew: float, folds: FoldSession | None = None,
                 may_fold: Callable[[str], bool] = lambda root_pipeline: True) -> None:
        self.registry = registry
        self.pipelines = pipelines
        self.template = template
        self.now = now
        self.max_skew = max_skew
        self.folds = folds if folds is not None else FoldSession(Folds())
        self.may_fold = may_fold
        self._batch_starts: dict[tuple[str, str], float] = {}

    def __call__(self, event: RunEvent) -> Start | Finish | Discard | tuple[Finish, ...] | None:
        pipeline = self.pipeline_name(event.job)
        now = self.now()
        at = _epoch(event.eventTime, "eventTime", now, self.max_skew)
        run_id = event.run.runId
        root = self.root_of(event)
        folding = False
        if root is not None:
            tracked = self.tracked(pipeline, root[0])
            folding = self.may_fold_into(root[0], tracked)
            if folding:
                self.fold_child(root, event)
            if not tracked:
                raise Ignored("child_run")
        if event.eventType == "START":
            self._batch_starts.setdefault((pipeline, run_id), at)
            if folding:  # closed with its root if still in progress then
                self.folds.track(root, pipeline, run_id, at)
            return Start(pipeline, run_id, at, self.team_hint(pipeline, event, root), received(at, now))
        if event.eventType not in TERMINAL:
            return None
        if root is not None:
            return self.child_finish(pipeline, root, event, at, now)
        return self.root_finish(pipeline, event, at, now)

    def root_of(self, event: RunEvent) -> RootKey | None:
        """(root pipeline, root run id) of a child run of this system; None for a root run."""
        top = ol.parent_of(event.run.facets)
        if top is None:
            return None
        namespace, name, run_id = top
        if namespace != event.job.namespace:
            return None  # started by another system (dbt-ol in an Airflow task): a pipeline of its own
        parent = ol.direct_parent(event.run.facets)
        return self.folds.root_of(parent[2] if parent else run_id, (self._name(namespace, name), run_id))

    def may_fold_into(self, root_pipeline: str, tracked: bool) -> bool:
        """Whether a child's event adds to its root run. For a token that may not write the root, a child that is
        no pipeline of its own is refused (403); a tracked child is admitted on its own team and adds nothing."""
        try:
            return self.may_fold(root_pipeline)
        except Rejection:
            if tracked:
                return False
            raise

    def tracked(self, child: str, root_pipeline: str) -> bool:
        """Whether a child job is a pipeline of its own: its root tracks children, or a registry entry other
        than its root's names it (a pattern such as `orders_*` that matches a DAG does not opt in its tasks
        `orders_daily.load`; `orders_daily.*` does)."""
        spec, root_spec = self.registry.lookup(child), self.registry.lookup(root_pipeline)
        if root_spec is not None and root_spec.track_children:
            return True
        return spec is not None and spec.registered and (root_spec is None or spec.entry != root_spec.entry)

    def fold_child(self, root: RootKey, event: RunEvent) -> None:
        # Failed children are named only at the first level (an Airflow task, a dbt model): dbt's SQL statement
        # jobs `model.x.sql.N` under a model would only repeat their model's failure, under varying names.
        parent = ol.direct_parent(event.run.facets)
        first_level = parent is None or parent[2] == root[1]
        final = event.eventType == "FAIL" and first_level and not ol.will_retry(event.run.facets)
        rows = total_rows(event.outputs) if event.eventType in TERMINAL else None
        self.folds.child_event(root, event.job.name, event.run.runId, event.eventType, rows, final)

    def child_finish(self, pipeline: str, root: RootKey, event: RunEvent, at: float,
                     now: float) -> Finish | Discard:
        """A tracked child's terminal event: a try Airflow retries and a skipped child have no outcome."""
        run_id = event.run.runId
        self.folds.untrack(root, pipeline, run_id)
        if event.eventType == "ABORT" or (event.eventType == "FAIL" and ol.will_retry(event.run.facets)):
            return Discard(pipeline, run_id, at)
        return Finish(pipeline, run_id, TERMINAL[event.eventType], at, self.duration(pipeline, event, at),
                      total_rows(event.outputs), self.team_hint(pipeline, event, root), received(at, now))

    def root_finish(self, pipeline: str, event: RunEvent, at: float, now: float) -> Finish | tuple[Finish, ...]:
        """A root run's terminal event, with what its children said; tracked children still in progress are
        closed with it (a task killed by SIGKILL never sends its own terminal event)."""
        success = TERMINAL[event.eventType]
        fold = self.folds.close((pipeline, event.run.runId))
        records = total_rows(event.outputs)
        if fold is not None and fold.records is not None:
            records = min(MAX_RECORDS, (records or 0) + fold.records)
        failed = tuple(fold.failed) if fold is not None else ()
        finish = Finish(pipeline, event.run.runId, success, at, self.duration(pipeline, event, at), records,
                        self.team_hint(pipeline, event, None), received(at, now), failed)
        if fold is None or not fold.tracked:
            return finish
        closed = tuple(Finish(child, child_run, success, at, max(0.0, at - started), None, None, received(at, now))
                       for (child, child_run), started in fold.tracked.items() if self.in_progress(child, child_run))
        return finish, *closed

    def in_progress(self, pipeline: str, run_id: str) -> bool:
        """Whether a run is in progress (stored, or started earlier in this request): only such a child is closed
        with its root (a START that was refused left nothing to close)."""
        state = self.pipelines.get(pipeline)
        return (pipeline, run_id) in self._batch_starts or (state is not None and run_id in state.in_progress)

    def pipeline_name(self, job: Job) -> str:
        return self._name(job.namespace, job.name)

    def _name(self, namespace: str, name: str) -> str:
        name = self.template.format(namespace=namespace, name=name)
        if len(name) > PIPELINE_NAME_MAX:
            raise InvalidEvent("job.name", f"the pipeline name {name[:40]!r}… is longer than {PIPELINE_NAME_MAX}")
        return name

    def duration(self, pipeline: str, event: RunEvent, finished: float) -> float | None:
        run_id = event.run.runId
        started = self._batch_starts.get((pipeline, run_id))
        if started is None:
            state = self.pipelines.get(pipeline)
            started = state.run_start(run_id) if state is not None else None
        if started is None:  # START lost, late, or never sent (`airflow dags test`): the producer's facets
            started = ol.started_at(event.run.facets, finished)
        if started is None:
            return None  # the run counts, without a duration sample
        if started > finished:
            log.warning("run %s of %s: terminal eventTime before START; no duration recorded", run_id, pipeline)
            return None
        return finished - started

    def team_hint(self, pipeline: str, event: RunEvent, root: RootKey | None) -> str | None:
        """The team the producer names (ownership facets, Airflow's DAG owner, dbt's output datasets; a tracked
        child: else its root's team), for a pipeline the registry does not list and pipemon has not seen yet;
        None otherwise: the registry, or the team of the first event, decides. With `unknown_pipelines: ignore`
        an unlisted pipeline whose producer names a registry team is accepted as that team's."""
        spec = self.registry.lookup(pipeline)
        if spec is None and not self.registry.ignores_unknown:
            return None  # rejected anyway
        if (spec is not None and spec.registered) or self.pipelines.get(pipeline) is not None:
            return None
        names = ol.owner_names(event.job.facets, event.run.facets, [o.facets for o in event.outputs])
        team = ol.team_of_owners(names, self.registry.teams)
        if team is None and root is not None:
            root_state = self.pipelines.get(root[0])
            team = root_state.team if root_state is not None and root_state.team in self.registry.teams else None
        return team


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
