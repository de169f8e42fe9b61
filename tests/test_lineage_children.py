"""OpenLineage child runs (issue 13): a pipeline is a root run; children are folded into it unless the registry
opts them in. Driven by the real openlineage-python client on a real port, with the facets the real producers
send (Airflow's `airflow` / `airflowDagRun`, the parent facet, dbt's dataset ownership)."""

import dataclasses
import time
from datetime import UTC, datetime

import attr
import pytest
from openlineage.client.event_v2 import Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    output_statistics_output_dataset,
    ownership_dataset,
    ownership_job,
    parent_run,
)
from openlineage.client.generated.base import RunFacet
from openlineage.client.serde import Serde
from openlineage.client.uuid import generate_new_uuid

from pipemon.service.app import EXPORTER_KEY, create_app
from tests.conftest import make_tokens
from tests.helpers import value
from tests.test_lineage import PRODUCER, Lineage

NS = "airflow-prod"
REGISTRY = """unknown_pipelines: {unknown}
teams:
  data-eng: {{}}
  analytics: {{}}
  finance: {{}}
pipelines:
  - {{match: orders_daily, team: data-eng}}
  - {{match: billing, team: finance, track_children: true}}
  - {{match: "reports.*", team: analytics}}
  - {{match: "shop_*", team: analytics}}
"""


@attr.define
class AirflowRunFacet(RunFacet):
    """The provider's `airflow` run facet, as much of it as pipemon reads (plus what it must ignore)."""

    taskInstance: dict
    task: dict


@attr.define
class AirflowDagRunFacet(RunFacet):
    dag: dict
    dagRun: dict


def rid() -> str:
    return str(generate_new_uuid())


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def event(state: RunState, run_id: str, at: float, name: str, parent: tuple[str, str] | None = None,
          namespace: str = NS, rows: int | None = None, try_number: int | None = None, retries: int = 0,
          owners: list[str] | None = None, dataset_owners: list[str] | None = None,
          dag_run: dict | None = None, root: tuple[str, str] | None = None) -> RunEvent:
    """An event as the real producers shape it; `parent`/`root` = (job name, run id) in namespace NS."""
    run_facets: dict = {}
    if parent is not None:
        top = root or parent
        run_facets["parent"] = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=parent[1]), job=parent_run.Job(namespace=NS, name=parent[0]),
            root=parent_run.Root(run=parent_run.RootRun(runId=top[1]), job=parent_run.RootJob(namespace=NS,
                                                                                               name=top[0])))
    if try_number is not None:
        run_facets["airflow"] = AirflowRunFacet(taskInstance={"try_number": try_number, "pool": "default_pool"},
                                                task={"retries": retries, "task_id": name})
    if dag_run is not None:
        run_facets["airflowDagRun"] = AirflowDagRunFacet(dag={"dag_id": name, "owner": "airflow"}, dagRun=dag_run)
    job_facets = {"ownership": ownership_job.OwnershipJobFacet(
        owners=[ownership_job.Owner(name=o) for o in owners])} if owners else {}
    output_facets = {"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=rows)} if rows is not None else {}
    facets = {"ownership": ownership_dataset.OwnershipDatasetFacet(
        owners=[ownership_dataset.Owner(name=o) for o in dataset_owners])} if dataset_owners else {}
    outputs = [OutputDataset(namespace="duckdb", name=f"main.{name}", facets=facets, outputFacets=output_facets)
               ] if rows is not None or dataset_owners else []
    return RunEvent(eventType=state, eventTime=iso(at), run=Run(runId=run_id, facets=run_facets),
                    job=Job(namespace=namespace, name=name, facets=job_facets), outputs=outputs, producer=PRODUCER)


@pytest.fixture
def exporter(aiohttp_client, config, tmp_path):
    async def start(unknown: str = "accept"):
        registry = tmp_path / "registry.yaml"
        registry.write_text(REGISTRY.format(unknown=unknown))
        app = create_app(dataclasses.replace(config, registry=registry))
        client = await aiohttp_client(app)
        client.exporter = app[EXPORTER_KEY]
        return client, Lineage(str(client.make_url("/")))

    return start


async def pipelines(client) -> dict[str, dict]:
    listed = (await (await client.get("/api/v1/pipelines")).json())["pipelines"]
    return {p["pipeline"]: p for p in listed if p["runs_success"] + p["runs_failure"] + p["runs_in_progress"]}


async def detail(client, name: str) -> dict:
    return await (await client.get(f"/api/v1/pipelines/{name}")).json()


async def test_a_dags_tasks_are_folded_into_the_dag_run(exporter):
    client, ol = await exporter()
    dag, now = rid(), time.time()
    extract, load, load_retry, check = rid(), rid(), rid(), rid()
    parent = ("orders_daily", dag)
    assert (await ol.answer(event(RunState.START, dag, now - 100, "orders_daily")))["status"] == "accepted"
    answers = [await ol.answer(e) for e in (
        event(RunState.START, extract, now - 90, "orders_daily.extract", parent, try_number=1),
        event(RunState.COMPLETE, extract, now - 80, "orders_daily.extract", parent, rows=1000, try_number=1),
        event(RunState.START, load, now - 70, "orders_daily.load", parent, try_number=1, retries=1),
        # try 1 of 2 fails: Airflow retries it, it is no failed child
        event(RunState.FAIL, load, now - 60, "orders_daily.load", parent, try_number=1, retries=1),
        event(RunState.START, load_retry, now - 50, "orders_daily.load", parent, try_number=2, retries=1),
        event(RunState.COMPLETE, load_retry, now - 40, "orders_daily.load", parent, rows=250, try_number=2,
              retries=1),
        event(RunState.COMPLETE, load_retry, now - 40, "orders_daily.load", parent, rows=250, try_number=2,
              retries=1),  # delivered twice: its rows count once
        event(RunState.START, check, now - 30, "orders_daily.check", parent, try_number=1),
        event(RunState.FAIL, check, now - 20, "orders_daily.check", parent, try_number=1, retries=0),
    )]
    assert answers == [{"status": "ignored", "reason": "child_run"}] * 9
    await ol.emit(event(RunState.FAIL, dag, now - 10, "orders_daily"))
    text = await (await client.get("/metrics")).text()
    assert list(await pipelines(client)) == ["orders_daily"]  # one pipeline per DAG, none per task
    p = {"pipeline": "orders_daily", "team": "data-eng"}
    assert value(text, "pipeline_runs_total", **p, status="failure") == 1  # one failed DAG run is one failure
    assert value(text, "pipeline_records_processed_total", **p) == 1250
    assert value(text, "pipemon_events_ignored_total", reason="child_run") == 9
    assert sum(v for k, v in _family(text, "pipemon_events_rejected_total").items()) == 0
    last = (await detail(client, "orders_daily"))["last_run"]
    assert last == {"duration_seconds": pytest.approx(90, abs=0.01), "records": 1250,
                    "throughput_records_per_second": pytest.approx(1250 / 90, rel=1e-3),
                    "failed_children": ["orders_daily.check"]}


def _family(text: str, name: str) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


async def test_registered_children_are_pipelines_and_retries_are_not_failures(exporter):
    client, ol = await exporter()
    dag, now = rid(), time.time()
    parent = ("reports", dag)
    first, second, killed = rid(), rid(), rid()
    await ol.emit(event(RunState.START, dag, now - 100, "reports"),
                  event(RunState.START, first, now - 90, "reports.build", parent, try_number=1, retries=2),
                  event(RunState.FAIL, first, now - 80, "reports.build", parent, try_number=1, retries=2),
                  event(RunState.START, second, now - 70, "reports.build", parent, try_number=2, retries=2),
                  event(RunState.COMPLETE, second, now - 60, "reports.build", parent, try_number=2, retries=2),
                  # SIGKILLed: a START and never a terminal event of its own
                  event(RunState.START, killed, now - 50, "reports.publish", parent, try_number=1))
    text = await (await client.get("/metrics")).text()
    build = {"pipeline": "reports.build", "team": "analytics"}
    publish = {"pipeline": "reports.publish", "team": "analytics"}
    assert value(text, "pipeline_runs_total", **build, status="failure") == 0  # retried to success
    assert value(text, "pipeline_runs_total", **build, status="success") == 1
    assert value(text, "pipeline_runs_in_progress", **build) == 0
    assert value(text, "pipeline_runs_in_progress", **publish) == 1
    await ol.emit(event(RunState.FAIL, dag, now - 10, "reports"))  # its DAG fails: the killed task ends with it
    text = await (await client.get("/metrics")).text()
    assert value(text, "pipeline_runs_in_progress", **publish) == 0
    assert value(text, "pipeline_runs_total", **publish, status="failure") == 1
    assert value(text, "pipeline_run_duration_seconds_sum", **publish) == pytest.approx(40, abs=0.01)
    # the DAG itself is unknown to the registry: accepted as unowned, as before
    assert value(text, "pipeline_runs_total", pipeline="reports", team="unowned", status="failure") == 1


async def test_a_pattern_that_matches_the_root_does_not_opt_its_children_in(exporter):
    client, ol = await exporter()
    dag, task, now = rid(), rid(), time.time()
    await ol.emit(event(RunState.START, dag, now - 30, "shop_daily"),
                  event(RunState.START, task, now - 20, "shop_daily.load", ("shop_daily", dag)),
                  event(RunState.COMPLETE, task, now - 15, "shop_daily.load", ("shop_daily", dag), rows=7),
                  event(RunState.COMPLETE, dag, now - 10, "shop_daily"))
    assert {n: p["team"] for n, p in (await pipelines(client)).items()} == {"shop_daily": "analytics"}
    assert (await detail(client, "shop_daily"))["last_run"]["records"] == 7


async def test_track_children_makes_a_roots_children_pipelines_of_its_team(exporter):
    client, ol = await exporter()
    root, child, now = rid(), rid(), time.time()
    await ol.emit(event(RunState.START, root, now - 30, "billing"),
                  event(RunState.START, child, now - 20, "billing.invoice", ("billing", root)),
                  event(RunState.ABORT, child, now - 15, "billing.invoice", ("billing", root)),  # skipped
                  event(RunState.COMPLETE, root, now - 10, "billing"))
    listed = await pipelines(client)
    assert {name: p["team"] for name, p in listed.items()} == {"billing": "finance"}  # skipped: no outcome
    text = await (await client.get("/metrics")).text()
    assert value(text, "pipeline_runs_in_progress", pipeline="billing.invoice", team="finance") == 0
    assert value(text, "pipeline_runs_total", pipeline="billing.invoice", team="finance", status="failure") == 0


async def test_a_child_of_another_namespace_is_a_pipeline_of_its_own(exporter):
    client, ol = await exporter()
    task, dbt, now = rid(), rid(), time.time()
    # dbt-ol started by an Airflow task: its parent facet names the task, in Airflow's namespace
    await ol.emit(event(RunState.START, dbt, now - 30, "dbt-run-shop", ("orders_daily.transform", task),
                        namespace="dbt"),
                  event(RunState.COMPLETE, dbt, now - 10, "dbt-run-shop", ("orders_daily.transform", task),
                        namespace="dbt"))
    assert list(await pipelines(client)) == ["dbt-run-shop"]
    assert (await detail(client, "dbt-run-shop"))["last_run"]["duration_seconds"] == pytest.approx(20, abs=0.01)


async def test_grandchildren_without_a_root_facet_fold_into_the_root(exporter):
    """dbt's structured logs: SQL statement jobs whose parent is a model, whose parent is the invocation."""
    client, ol = await exporter()
    invocation, model, statement, now = rid(), rid(), rid(), time.time()
    await ol.emit(event(RunState.START, invocation, now - 30, "orders_daily"),
                  event(RunState.START, model, now - 25, "model.shop.orders", ("orders_daily", invocation)))
    nested = event(RunState.FAIL, statement, now - 20, "model.shop.orders.sql.1", ("model.shop.orders", model),
                   rows=5)
    nested.run.facets["parent"].root = None
    assert (await ol.answer(nested))["reason"] == "child_run"
    await ol.emit(event(RunState.FAIL, model, now - 15, "model.shop.orders", ("orders_daily", invocation)),
                  event(RunState.FAIL, invocation, now - 10, "orders_daily"))
    last = (await detail(client, "orders_daily"))["last_run"]
    assert last["failed_children"] == ["model.shop.orders"]  # the model is named, not its statement
    assert last["records"] == 5  # the statement's rows reached the root through its parent
    assert list(await pipelines(client)) == ["orders_daily"]


async def test_unknown_pipelines_ignore_answers_200_and_counts_them(exporter):
    client, ol = await exporter(unknown="ignore")
    now = time.time()
    answer = await ol.answer(event(RunState.COMPLETE, rid(), now, "somebody_elses_job"))
    assert answer == {"status": "ignored", "reason": "unknown_pipeline"}
    assert (await ol.answer(event(RunState.COMPLETE, rid(), now, "orders_daily")))["status"] == "accepted"
    text = await (await client.get("/metrics")).text()
    assert value(text, "pipemon_events_ignored_total", reason="unknown_pipeline") == 1
    assert value(text, "pipemon_events_rejected_total", reason="unknown_pipeline") == 0
    assert list(await pipelines(client)) == ["orders_daily"]
    # unlisted, but its owner is a team of the registry (Airflow's DAG owner): that team's pipeline
    owned = await ol.answer(event(RunState.COMPLETE, rid(), now, "ml_features", owners=["airflow", "team:finance"]))
    assert owned["status"] == "accepted"
    assert (await pipelines(client))["ml_features"]["team"] == "finance"
    # a batch counts its ignored items apart
    body = b"\n".join(Serde.to_json(event(RunState.COMPLETE, rid(), now, n)).encode() for n in ("orders_daily", "x"))
    summary = await (await client.post("/api/v1/lineage", data=body,
                                       headers={"Content-Type": "application/x-ndjson"})).json()
    assert (summary["accepted"], summary["ignored"], summary["rejected"]) == (1, 1, 0)
    assert value(await (await client.get("/metrics")).text(), "pipemon_events_ignored_total",
                 reason="unknown_pipeline") == 2


async def test_dag_duration_without_a_start_comes_from_the_dag_run_facet(exporter):
    """`airflow dags test` sends no DAG-level START; the COMPLETE carries the DAG run's start date."""
    client, ol = await exporter()
    now = time.time()
    await ol.emit(event(RunState.COMPLETE, rid(), now - 5, "orders_daily",
                        dag_run={"start_date": iso(now - 65), "duration": 60.0, "run_id": "manual__x"}),
                  event(RunState.COMPLETE, rid(), now - 4, "billing", dag_run={"duration": 12.5}))
    assert (await detail(client, "orders_daily"))["last_run"]["duration_seconds"] == pytest.approx(60, abs=0.01)
    assert (await detail(client, "billing"))["last_run"]["duration_seconds"] == pytest.approx(12.5, abs=0.01)


async def test_team_from_dag_owner_and_dataset_ownership_registry_first(exporter):
    client, ol = await exporter()
    now = time.time()
    await ol.emit(event(RunState.COMPLETE, rid(), now, "adhoc_dag", owners=["airflow", "team:analytics"]),
                  event(RunState.COMPLETE, rid(), now, "adhoc_model", dataset_owners=["finance"]),
                  event(RunState.COMPLETE, rid(), now, "orders_daily", owners=["team:analytics"],
                        dataset_owners=["finance"]))
    teams = {name: p["team"] for name, p in (await pipelines(client)).items()}
    assert teams == {"adhoc_dag": "analytics", "adhoc_model": "finance", "orders_daily": "data-eng"}


async def test_failed_children_survive_a_restart(aiohttp_client, config, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(unknown="accept"))
    cfg = dataclasses.replace(config, registry=registry)
    dag, task, now = rid(), rid(), time.time()
    client = await aiohttp_client(create_app(cfg))
    ol = Lineage(str(client.make_url("/")))
    await ol.emit(event(RunState.START, dag, now - 20, "orders_daily"),
                  event(RunState.FAIL, task, now - 15, "orders_daily.load", ("orders_daily", dag), try_number=1),
                  event(RunState.FAIL, dag, now - 10, "orders_daily"))
    await client.close()
    client = await aiohttp_client(create_app(cfg))
    assert (await detail(client, "orders_daily"))["last_run"]["failed_children"] == ["orders_daily.load"]


def test_the_documented_orchestrators_registry_is_valid_and_shown_verbatim():
    from pipemon.model.registry import load_registry
    from tests.integrations.common import REGISTRY as DOCUMENTED

    registry = load_registry(DOCUMENTED)
    assert registry.ignores_unknown
    docs = (DOCUMENTED.parents[1] / "integrations.md").read_text()
    assert DOCUMENTED.read_text() in docs


async def test_a_refused_child_start_leaves_nothing_to_close(aiohttp_client, config, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(unknown="accept"))
    app = create_app(dataclasses.replace(config, registry=registry, max_pipelines=3))  # 2 registered + the DAG
    client = await aiohttp_client(app)
    ol = Lineage(str(client.make_url("/")))
    dag, task, now = rid(), rid(), time.time()
    await ol.emit(event(RunState.START, dag, now - 30, "reports"))
    refused = await (await client.post("/api/v1/lineage", data=Serde.to_json(
        event(RunState.START, task, now - 20, "reports.build", ("reports", dag))))).json()
    assert refused["error"]["reason"] == "pipeline_cap"
    await ol.emit(event(RunState.FAIL, dag, now - 10, "reports"))
    assert "reports.build" not in await pipelines(client)
    assert (await pipelines(client))["reports"]["runs_failure"] == 1


def tokened_app(config, tmp_path, **tokens: str):
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(unknown="accept"))
    return create_app(dataclasses.replace(config, registry=registry), make_tokens(**tokens))


async def post_as(client, token: str, *events: RunEvent) -> list[tuple[int, dict]]:
    answers = []
    for e in events:
        resp = await client.post("/api/v1/lineage", data=Serde.to_json(e),
                                 headers={"Authorization": f"Bearer {token}"})
        answers.append((resp.status, await resp.json()))
    return answers


async def test_only_a_token_that_may_write_the_root_adds_to_it(aiohttp_client, config, tmp_path):
    client = await aiohttp_client(tokened_app(config, tmp_path, de="data-eng", an="analytics"))
    dag, now = rid(), time.time()
    parent = ("orders_daily", dag)
    assert (await post_as(client, "de", event(RunState.START, dag, now - 50, "orders_daily")))[0][0] == 200
    foreign = await post_as(client, "an",
                            event(RunState.COMPLETE, rid(), now - 40, "orders_daily.load", parent, rows=1000),
                            event(RunState.FAIL, rid(), now - 30, "orders_daily.check", parent, try_number=1))
    assert [(status, body["error"]["reason"]) for status, body in foreign] == [(403, "forbidden")] * 2
    own = await post_as(client, "de", event(RunState.COMPLETE, rid(), now - 20, "orders_daily.extract", parent,
                                            rows=5))
    assert own == [(200, {"status": "ignored", "reason": "child_run"})]
    # The root's finish refused once keeps its children's fold for the finish that is accepted.
    finish = event(RunState.COMPLETE, dag, now - 10, "orders_daily")
    assert (await post_as(client, "an", finish))[0][0] == 403
    assert (await post_as(client, "de", finish))[0][1]["status"] == "accepted"
    last = (await detail(client, "orders_daily"))["last_run"]
    assert (last["records"], last["failed_children"]) == (5, [])


async def test_a_root_finish_closes_only_the_children_its_token_may_write(aiohttp_client, config, tmp_path):
    client = await aiohttp_client(tokened_app(config, tmp_path, de="data-eng", root="admin"))
    dag, build, now = rid(), rid(), time.time()
    assert (await post_as(client, "de", event(RunState.START, dag, now - 30, "reports")))[0][0] == 200
    # reports.* is analytics' in the registry: a pipeline of its own, started by a token that may write it
    started = await post_as(client, "root", event(RunState.START, build, now - 20, "reports.build", ("reports", dag)))
    assert started[0][1]["status"] == "accepted"
    assert (await post_as(client, "de", event(RunState.FAIL, dag, now - 10, "reports")))[0][1]["status"] == (
        "accepted")
    listed = await pipelines(client)
    assert listed["reports"]["runs_failure"] == 1
    assert (listed["reports.build"]["runs_in_progress"], listed["reports.build"]["runs_failure"]) == (1, 0)


async def test_a_tracked_child_of_another_teams_root_is_reported_with_its_own_teams_token(aiohttp_client, config,
                                                                                           tmp_path):
    client = await aiohttp_client(tokened_app(config, tmp_path, de="data-eng", an="analytics"))
    dag, build, now = rid(), rid(), time.time()
    assert (await post_as(client, "de", event(RunState.START, dag, now - 30, "reports")))[0][0] == 200
    # reports.* is analytics': a pipeline of its own, reported with analytics' token; it adds nothing to the root
    answers = await post_as(client, "an",
                            event(RunState.START, build, now - 25, "reports.build", ("reports", dag)),
                            event(RunState.COMPLETE, build, now - 20, "reports.build", ("reports", dag), rows=9))
    assert [body["status"] for _, body in answers] == ["accepted", "accepted"]
    assert (await post_as(client, "de", event(RunState.COMPLETE, dag, now - 10, "reports")))[0][0] == 200
    listed = await pipelines(client)
    assert (listed["reports.build"]["team"], listed["reports.build"]["runs_success"]) == ("analytics", 1)
    assert (await detail(client, "reports"))["last_run"]["records"] is None


def test_a_root_finish_sees_the_children_folded_by_a_request_still_being_stored():
    from pipemon.openlineage.folding import Folds, FoldSession

    shared, root = Folds(), ("orders_daily", "dag-1")
    storing = FoldSession(shared)  # a request whose child event is folded, its records not stored yet
    storing.child_event(root, "orders_daily.load", "task-1", "COMPLETE", 70, False)
    finishing = FoldSession(shared)
    assert finishing.close(root).records == 70
    finishing.commit()
    storing.commit()
    assert len(shared) == 0  # no fold left behind for the closed root
    retried = FoldSession(shared)  # the first request answered 503 and sent again: the child counts once
    retried.child_event(("orders_daily", "dag-2"), "orders_daily.load", "task-2", "COMPLETE", 5, False)
    retried.child_event(("orders_daily", "dag-2"), "orders_daily.load", "task-2", "COMPLETE", 5, False)
    assert retried.close(("orders_daily", "dag-2")).records == 5
