"""`POST /api/v1/lineage`, driven by the real openlineage-python client (HTTP transport) on a real port."""

import asyncio
import dataclasses
import gzip
import json
import math
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import output_statistics_output_dataset, ownership_job
from openlineage.client.serde import Serde
from openlineage.client.transport.http import ApiKeyTokenProvider, HttpCompression, HttpConfig, HttpTransport
from openlineage.client.uuid import generate_new_uuid

from pipemon.service.app import EXPORTER_KEY, create_app
from tests.conftest import EXAMPLE_REGISTRY, make_tokens
from tests.helpers import same, samples, value
from tests.procs import free_port, running

REFERENCE_EVENT = Path("/work/shared/reference/openlineage-runevent.json")
P = {"pipeline": "orders_daily", "team": "data-eng"}
PRODUCER = "https://github.com/pipemon/pipemon/tests"


def ol_event(state: RunState, run_id: str, at: float, name: str = "orders_daily", namespace: str = "airflow-prod",
             rows: list[int | None] | None = None, owners: list[str] | None = None) -> RunEvent:
    facets = {"ownership": ownership_job.OwnershipJobFacet(owners=[ownership_job.Owner(name=o) for o in owners])
              } if owners else {}
    outputs = [OutputDataset(namespace="postgres://db:5432", name=f"public.t{i}", outputFacets={} if n is None else {
        "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=n)})
        for i, n in enumerate(rows or [])]
    return RunEvent(eventType=state, eventTime=datetime.fromtimestamp(at, UTC).isoformat(), run=Run(runId=run_id),
                    job=Job(namespace=namespace, name=name, facets=facets), outputs=outputs, producer=PRODUCER)


def new_run_id() -> str:
    return str(generate_new_uuid())


class Lineage:
    """An openlineage-python client whose HTTP transport points at the exporter; emits from a thread."""

    def __init__(self, url: str, **config: object) -> None:
        self.transport = HttpTransport(HttpConfig(url=url, endpoint="api/v1/lineage", timeout=5,
                                                  retry={"total": 0}, **config))
        self.client = OpenLineageClient(transport=self.transport)

    async def emit(self, *events: RunEvent) -> None:
        for event in events:
            await asyncio.to_thread(self.client.emit, event)

    async def answer(self, event: RunEvent) -> dict:
        """The exporter's answer to one event (the transport returns the response)."""
        return (await asyncio.to_thread(self.transport.emit, event)).json()


@pytest.fixture
def exporter(aiohttp_client, config):
    """Start an exporter app on a real port; returns (http client, openlineage client)."""

    async def start(cfg=None, tokens=None, clock=time.time, sweep_interval: float | None = None, **ol_config):
        app = create_app(cfg or config, tokens, clock)
        recorder = app[EXPORTER_KEY].recorder
        if sweep_interval is not None:
            recorder.settings = dataclasses.replace(recorder.settings, sweep_interval=sweep_interval)
        client = await aiohttp_client(app)
        return client, Lineage(str(client.make_url("/")), **ol_config)

    return start


async def metrics(client) -> str:
    return await (await client.get("/metrics")).text()


def assert_pipelines_unchanged(before: dict, after: dict) -> None:
    series = {k for k in after if k[0].startswith("pipeline_")}
    assert series == {k for k in before if k[0].startswith("pipeline_")}
    assert [k for k in series if not same(after[k], before[k])] == []


async def test_start_then_complete_counts_a_success_with_duration_and_rows(exporter):
    client, ol = await exporter()
    run_id, now = new_run_id(), time.time()
    await ol.emit(ol_event(RunState.START, run_id, now - 120))
    text = await metrics(client)
    assert value(text, "pipeline_runs_in_progress", **P) == 1
    assert value(text, "pipeline_oldest_run_start_timestamp_seconds", **P) == pytest.approx(now - 120, abs=0.01)
    await ol.emit(ol_event(RunState.RUNNING, run_id, now - 60),
                  ol_event(RunState.COMPLETE, run_id, now - 20, rows=[100, None, 25]))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_total", **P, status="failure") == 0
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    assert value(text, "pipeline_run_duration_seconds_count", **P) == 1
    assert value(text, "pipeline_run_duration_seconds_sum", **P) == pytest.approx(100, abs=0.01)
    assert value(text, "pipeline_records_processed_total", **P) == 125
    assert value(text, "pipeline_last_success_timestamp_seconds", **P) == pytest.approx(now - 20, abs=0.01)
    assert value(text, "pipemon_events_received_total", endpoint="lineage") == 3


async def test_start_then_fail_and_abort_are_failures(exporter):
    client, ol = await exporter()
    failed, aborted, now = new_run_id(), new_run_id(), time.time()
    await ol.emit(ol_event(RunState.START, failed, now - 50), ol_event(RunState.FAIL, failed, now - 40),
                  ol_event(RunState.START, aborted, now - 30), ol_event(RunState.ABORT, aborted, now - 10))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 2
    assert value(text, "pipeline_runs_total", **P, status="success") == 0
    assert value(text, "pipeline_run_duration_seconds_sum", **P) == pytest.approx(30, abs=0.01)
    assert value(text, "pipeline_consecutive_failures", **P) == 2
    assert value(text, "pipeline_runs_in_progress", **P) == 0


async def test_complete_without_start_counts_without_a_duration_sample(exporter):
    client, ol = await exporter()
    now = time.time()
    await ol.emit(ol_event(RunState.COMPLETE, new_run_id(), now - 5, rows=[7]))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_run_duration_seconds_count", **P) == 0
    assert math.isnan(value(text, "pipeline_last_run_duration_seconds", **P))
    assert value(text, "pipeline_records_processed_total", **P) == 7
    assert value(text, "pipeline_last_success_timestamp_seconds", **P) == pytest.approx(now - 5, abs=0.01)


async def test_duplicate_delivery_counts_once(exporter):
    client, ol = await exporter()
    run_id, now = new_run_id(), time.time()
    start, complete = ol_event(RunState.START, run_id, now - 60), ol_event(RunState.COMPLETE, run_id, now, rows=[3])
    assert (await ol.answer(start))["status"] == "accepted"
    assert (await ol.answer(start))["status"] == "duplicate"
    assert (await ol.answer(complete))["status"] == "accepted"
    assert (await ol.answer(complete))["status"] == "duplicate"
    # A second terminal event of another type for the same run is a duplicate too: the first one counts.
    assert (await ol.answer(ol_event(RunState.FAIL, run_id, now)))["status"] == "duplicate"
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_total", **P, status="failure") == 0
    assert value(text, "pipeline_records_processed_total", **P) == 3
    assert value(text, "pipemon_events_duplicate_total") == 3


async def test_start_arriving_after_its_terminal_event_changes_nothing(exporter):
    client, ol = await exporter()
    run_id, now = new_run_id(), time.time()
    await ol.emit(ol_event(RunState.FAIL, run_id, now - 10))
    assert (await ol.answer(ol_event(RunState.START, run_id, now - 100)))["status"] == "duplicate"
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    assert value(text, "pipeline_run_duration_seconds_count", **P) == 0


async def test_start_and_complete_in_one_ndjson_batch_give_the_duration(exporter):
    client, _ = await exporter()
    run_id, now = new_run_id(), time.time()
    lines = [ol_event(RunState.START, run_id, now - 30), ol_event(RunState.COMPLETE, run_id, now - 10, rows=[4]),
             ol_event(RunState.OTHER, run_id, now)]
    body = "\n".join(json.dumps(_json(e)) for e in lines)
    resp = await client.post("/api/v1/lineage", data=body, headers={"Content-Type": "application/x-ndjson"})
    answer = await resp.json()
    assert [r["status"] for r in answer["results"]] == ["accepted"] * 3
    text = await metrics(client)
    assert value(text, "pipeline_run_duration_seconds_sum", **P) == pytest.approx(20, abs=0.01)
    assert value(text, "pipeline_runs_in_progress", **P) == 0


async def test_running_and_other_are_accepted_and_change_nothing(exporter):
    client, ol = await exporter()
    before = samples(await metrics(client))
    run_id = new_run_id()
    assert (await ol.answer(ol_event(RunState.RUNNING, run_id, time.time())))["status"] == "accepted"
    assert (await ol.answer(ol_event(RunState.OTHER, run_id, time.time())))["status"] == "accepted"
    after = samples(await metrics(client))
    assert_pipelines_unchanged(before, after)


async def test_rows_of_outputs_without_statistics_leave_records_unknown(exporter):
    client, ol = await exporter()
    await ol.emit(ol_event(RunState.COMPLETE, new_run_id(), time.time(), rows=[None, None]))
    text = await metrics(client)
    assert value(text, "pipeline_records_processed_total", **P) == 0
    assert math.isnan(value(text, "pipeline_last_run_records", **P))


async def test_team_from_the_registry_else_from_the_ownership_facet(exporter):
    client, ol = await exporter()
    now = time.time()
    await ol.emit(ol_event(RunState.COMPLETE, new_run_id(), now, owners=["team:analytics"]),  # registered: data-eng
                  ol_event(RunState.COMPLETE, new_run_id(), now, name="adhoc_a", owners=["user:jo", "team:analytics"]),
                  ol_event(RunState.COMPLETE, new_run_id(), now, name="adhoc_b", owners=["team:nobody"]),
                  ol_event(RunState.COMPLETE, new_run_id(), now, name="adhoc_a", owners=["team:finance"]))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_total", pipeline="adhoc_a", team="analytics", status="success") == 2
    assert value(text, "pipeline_runs_total", pipeline="adhoc_b", team="unowned", status="success") == 1


async def test_namespace_can_be_part_of_the_pipeline_name(exporter, config):
    client, ol = await exporter(dataclasses.replace(config, lineage_pipeline_name="{namespace}/{name}"))
    await ol.emit(ol_event(RunState.COMPLETE, new_run_id(), time.time(), namespace="spark-prod", name="features"))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", pipeline="spark-prod/features", team="unowned", status="success") == 1


async def test_reference_event_and_gzip_and_bearer_token(exporter):
    client, ol = await exporter(tokens=make_tokens(secret="data-eng"), auth=ApiKeyTokenProvider({"apiKey": "secret"}),
                                compression=HttpCompression.GZIP)
    await ol.emit(ol_event(RunState.FAIL, new_run_id(), time.time()))
    resp = await client.post("/api/v1/lineage", data=gzip.compress(REFERENCE_EVENT.read_bytes()),
                             headers={"Content-Encoding": "gzip", "Authorization": "Bearer secret"})
    assert (resp.status, (await resp.json())["status"]) == (200, "accepted")
    resp = await client.post("/api/v1/lineage", data=REFERENCE_EVENT.read_bytes())
    assert resp.status == 401
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 125000


def _json(event: RunEvent) -> dict:
    return json.loads(Serde.to_json(event))


def _reference(**changes: object) -> str:
    event = json.loads(REFERENCE_EVENT.read_text())
    for path, new in changes.items():
        *parents, key = path.split("__")
        node = event
        for parent in parents:
            node = node[parent] if not parent.isdigit() else node[int(parent)]
        if new is _DELETE:
            del node[key]
        else:
            node[key] = new
    return json.dumps(event)


_DELETE = object()
MALFORMED = [
    ("{not json", 400, "malformed", None),
    (_reference(eventType=_DELETE), 422, "invalid_field", "eventType"),
    (_reference(eventType="FINISHED"), 422, "invalid_field", "eventType"),
    (_reference(eventTime=_DELETE), 422, "invalid_field", "eventTime"),
    (_reference(eventTime="2025-01-22T14:05:10"), 422, "invalid_field", "eventTime"),
    (_reference(eventTime="2999-01-01T00:00:00Z"), 422, "future_timestamp", "eventTime"),
    # A missing nested field is named by its full path; the message names it too.
    (_reference(run__runId=_DELETE), 422, "invalid_field", "run.runId:runId"),
    (_reference(run=_DELETE), 422, "invalid_field", "run"),
    (_reference(job__namespace=_DELETE), 422, "invalid_field", "job.namespace:namespace"),
    (_reference(job__name=_DELETE), 422, "invalid_field", "job.name:name"),
    (_reference(job__name=""), 422, "invalid_field", "job.name"),
    (_reference(job__namespace="a\nb"), 422, "invalid_field", "job.namespace"),
    (_reference(outputs__0__outputFacets__outputStatistics__rowCount=-1), 422, "invalid_field",
     "outputs[0].outputFacets.outputStatistics.rowCount"),
    (_reference(outputs=[{"outputFacets": {"outputStatistics": {"rowCount": 2**53}}}] * 2), 422, "invalid_field",
     "outputs"),
]


@pytest.mark.parametrize(("body", "code", "reason", "field"), MALFORMED)
async def test_malformed_events_are_rejected_naming_the_field_and_change_nothing(exporter, body, code, reason, field):
    field, _, missing = field.partition(":") if field else (None, "", "")
    client, _ = await exporter()
    before = samples(await metrics(client))
    resp = await client.post("/api/v1/lineage", data=body)
    answer = await resp.json()
    assert (resp.status, answer["error"]["reason"], answer["error"].get("field")) == (code, reason, field)
    if missing:
        assert f"`{missing}`" in answer["error"]["message"]
    after = samples(await metrics(client))
    assert after[("pipemon_events_rejected_total", frozenset({("reason", reason)}))] == \
        before[("pipemon_events_rejected_total", frozenset({("reason", reason)}))] + 1
    assert_pipelines_unchanged(before, after)


async def test_the_client_sees_a_rejection_as_an_http_error(exporter):
    _, ol = await exporter()
    bad = ol_event(RunState.COMPLETE, new_run_id(), time.time())
    bad.eventTime = "2025-01-22T14:05:10"  # no time zone
    with pytest.raises(requests.HTTPError, match="422"):
        await ol.emit(bad)


async def test_a_start_that_never_finishes_is_abandoned_as_a_failure(exporter, config, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("teams:\n  t: {}\npipelines:\n  - {match: quick_job, team: t, max_runtime: 10s}\n")
    now = [time.time()]
    client, ol = await exporter(dataclasses.replace(config, registry=registry), clock=lambda: now[0],
                                sweep_interval=0.02)
    run_id = new_run_id()
    await ol.emit(ol_event(RunState.START, run_id, now[0] - 5, name="quick_job"))
    await asyncio.sleep(0.1)
    q = {"pipeline": "quick_job", "team": "t"}
    assert value(await metrics(client), "pipeline_runs_in_progress", **q) == 1  # 5 s < 3 × 10 s
    now[0] += 25  # 30 s after the start, but the START arrived 5 s late: its grace runs from the arrival
    await asyncio.sleep(0.1)
    assert value(await metrics(client), "pipeline_runs_in_progress", **q) == 1
    now[0] += 6
    for _ in range(100):
        text = await metrics(client)
        if value(text, "pipeline_runs_in_progress", **q) == 0:
            break
        await asyncio.sleep(0.02)
    assert value(text, "pipeline_runs_total", **q, status="failure") == 1
    assert value(text, "pipemon_runs_abandoned_total") == 1
    assert value(text, "pipeline_run_duration_seconds_count", **q) == 0
    # The terminal event arriving after all replaces the abandonment: the run is a success, with its duration.
    assert (await ol.answer(ol_event(RunState.COMPLETE, run_id, now[0], name="quick_job")))["status"] == "accepted"
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **q, status="success") == 1
    assert value(text, "pipeline_runs_abandonment_reverted_total", **q) == 1
    assert value(text, "pipemon_runs_abandonment_reverted_total") == 1
    assert value(text, "pipeline_run_duration_seconds_count", **q) == 1
    assert (value(text, "pipeline_last_run_success", **q), value(text, "pipeline_consecutive_failures", **q)) == (1, 0)
    assert (await ol.answer(ol_event(RunState.COMPLETE, run_id, now[0], name="quick_job")))["status"] == "duplicate"


@pytest.mark.slow
def test_the_exporter_process_takes_lineage_from_the_client(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--registry",
           str(EXAMPLE_REGISTRY), "--state-dir", str(tmp_path / "state")]
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", tmp_path / "exporter.log"):
        client = Lineage(f"http://127.0.0.1:{port}").client
        run_id, now = new_run_id(), time.time()
        client.emit(ol_event(RunState.START, run_id, now - 90, name="dbt_marts_nightly"))
        client.emit(ol_event(RunState.COMPLETE, run_id, now, name="dbt_marts_nightly", rows=[10, 20]))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    d = {"pipeline": "dbt_marts_nightly", "team": "analytics"}
    assert value(text, "pipeline_runs_total", **d, status="success") == 1
    assert value(text, "pipeline_run_duration_seconds_sum", **d) == pytest.approx(90, abs=0.01)
    assert value(text, "pipeline_records_processed_total", **d) == 30
    assert value(text, "pipemon_events_received_total", endpoint="lineage") == 2
