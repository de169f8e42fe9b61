"""The facets pipemon reads beyond the core RunEvent: parent runs, Airflow's run facets, ownership of datasets.

Facets are kept as raw JSON on the wire type and decoded here one by one, leniently: a facet pipemon cannot read
(another producer's shape, a version it does not know) is ignored, never a reason to reject the event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import msgspec

TEAM_PREFIX = "team:"
T = TypeVar("T")
RawFacets = dict[str, msgspec.Raw]


class _RunRef(msgspec.Struct):
    runId: str


class _JobRef(msgspec.Struct):
    namespace: str
    name: str


class _RootRef(msgspec.Struct):
    run: _RunRef
    job: _JobRef


class ParentFacet(msgspec.Struct):
    """`run.facets.parent` (ParentRunFacet 1.1: `root` names the run at the top of the tree)."""

    run: _RunRef
    job: _JobRef
    root: _RootRef | None = None


class _Owner(msgspec.Struct):
    name: str


class _Ownership(msgspec.Struct):
    owners: list[_Owner] = []


class _AirflowDag(msgspec.Struct):
    owner: str | None = None


class _AirflowDagRun(msgspec.Struct):
    start_date: str | None = None
    duration: float | None = None


class AirflowDagRunFacet(msgspec.Struct):
    """`run.facets.airflowDagRun`, on the DAG's own events (apache-airflow-providers-openlineage)."""

    dag: _AirflowDag | None = None
    dagRun: _AirflowDagRun | None = None


class _TaskInstance(msgspec.Struct):
    try_number: int | None = None
    duration: float | None = None


class _Task(msgspec.Struct):
    retries: int | None = None
    owner: str | None = None


class AirflowTaskFacet(msgspec.Struct):
    """`run.facets.airflow`, on a task instance's events."""

    dag: _AirflowDag | None = None
    dagRun: _AirflowDagRun | None = None
    taskInstance: _TaskInstance | None = None
    task: _Task | None = None


def facet(facets: RawFacets | None, key: str, kind: type[T]) -> T | None:
    """One facet decoded as `kind`, or None when it is absent or not in a shape pipemon reads."""
    raw = facets.get(key) if facets else None
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError:
        return None


def parent_of(run_facets: RawFacets | None) -> tuple[str, str, str] | None:
    """(namespace, job name, run id) of the run at the top of this run's tree, or None for a root run."""
    parent = facet(run_facets, "parent", ParentFacet)
    if parent is None:
        return None
    top = parent.root or parent
    return top.job.namespace, top.job.name, top.run.runId


def direct_parent(run_facets: RawFacets | None) -> tuple[str, str, str] | None:
    """(namespace, job name, run id) of the immediate parent, or None."""
    parent = facet(run_facets, "parent", ParentFacet)
    return None if parent is None else (parent.job.namespace, parent.job.name, parent.run.runId)


def will_retry(run_facets: RawFacets | None) -> bool:
    """Whether an Airflow task FAIL is followed by another try: `try_number` ≤ `task.retries`."""
    airflow = facet(run_facets, "airflow", AirflowTaskFacet)
    if airflow is None or airflow.taskInstance is None or airflow.task is None:
        return False
    tried, retries = airflow.taskInstance.try_number, airflow.task.retries
    return tried is not None and retries is not None and tried <= retries


def started_at(run_facets: RawFacets | None, finished: float) -> float | None:
    """When a run started, from its terminal event's facets: Airflow's DAG run (start date or duration) or
    task instance (duration). None when no facet says."""
    dag_run = facet(run_facets, "airflowDagRun", AirflowDagRunFacet)
    if dag_run is not None and dag_run.dagRun is not None:
        start = _timestamp(dag_run.dagRun.start_date)
        if start is not None:
            return start
        if dag_run.dagRun.duration is not None and dag_run.dagRun.duration >= 0:
            return finished - dag_run.dagRun.duration
    task = facet(run_facets, "airflow", AirflowTaskFacet)
    duration = task.taskInstance.duration if task is not None and task.taskInstance is not None else None
    if duration is not None and duration >= 0:
        return finished - duration
    return None


def owner_names(job_facets: RawFacets | None, run_facets: RawFacets | None,
                output_facets: list[RawFacets | None]) -> list[str]:
    """Owner names the producer gives, most specific first: the job's ownership facet (Airflow's DAG owner
    lands there), the Airflow DAG owner in the run facets, then the output datasets' ownership (dbt `meta.owner`)."""
    names: list[str] = []
    job = facet(job_facets, "ownership", _Ownership)
    names += [o.name for o in job.owners] if job else []
    for key, kind in (("airflowDagRun", AirflowDagRunFacet), ("airflow", AirflowTaskFacet)):
        found: Any = facet(run_facets, key, kind)
        if found is not None and found.dag is not None and found.dag.owner:
            names += [part.strip() for part in found.dag.owner.split(",")]
    for facets in output_facets:
        dataset = facet(facets, "ownership", _Ownership)
        names += [o.name for o in dataset.owners] if dataset else []
    return names


def team_of_owners(names: list[str], teams: set[str] | dict[str, Any]) -> str | None:
    """The first owner that names a registry team: `team:NAME`, or NAME itself."""
    for name in names:
        team = name.removeprefix(TEAM_PREFIX)
        if team in teams:
            return team
    return None


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None
