"""dbt-core 1.11 + dbt-duckdb + openlineage-dbt, for real: `dbt-ol run`, `dbt-ol build` and `dbt-ol run
--consume-structured-logs` on dbt_project/ (two models that build, one that fails, one skipped behind it), and one
run of the good models only. OPENLINEAGE_DBT_JOB_NAME makes every invocation the one pipeline `shop_dbt`, whatever
the command; the models are folded into it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integrations.common import ndjson, pipemon, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PROJECT = Path(__file__).parent / "dbt_project"
INVOCATIONS = (  # (arguments, expected exit code, the failed model's job name)
    (["run"], 1, "shop.main.shop.broken"),
    (["build"], 1, "shop.main.shop.broken.build.run"),
    (["run", "--consume-structured-logs"], 1, "model.shop.broken"),
    (["run", "--select", "stg_orders", "orders"], 0, None),
)


@pytest.fixture(scope="module")
def dbt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dbt")
    project = tmp / "project"
    shutil.copytree(PROJECT, project)
    events = tmp / "openlineage.ndjson"
    with pipemon(tmp) as exporter:
        config = tmp / "openlineage.yml"
        config.write_text(json.dumps({"transport": {"type": "composite", "transports": {
            "pipemon": {"type": "http", "url": exporter.url, "endpoint": "api/v1/lineage", "timeout": 5},
            "file": {"type": "file", "log_file_path": str(events), "append": True}}}}))
        env = tool_env("dbt", OPENLINEAGE_CONFIG=str(config), OPENLINEAGE_NAMESPACE="dbt-test",
                       OPENLINEAGE_DBT_JOB_NAME="shop_dbt", SHOP_DUCKDB=str(tmp / "shop.duckdb"),
                       DBT_SEND_ANONYMOUS_USAGE_STATS="false")
        failed_children = []
        for args, code, _ in INVOCATIONS:
            done = subprocess.run(["dbt-ol", *args, "--project-dir", str(project), "--profiles-dir", str(project)],
                                  env=env, cwd=project, capture_output=True, text=True, timeout=300)
            assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
            failed_children.append(exporter.pipeline("shop_dbt")["last_run"]["failed_children"])
        yield exporter, ndjson(events), failed_children


def test_one_pipeline_per_invocation_whatever_the_command(dbt):
    exporter, events, _ = dbt
    names = {e["job"]["name"] for e in events}
    assert {"shop.main.shop.orders", "shop.main.shop.orders.build.run", "model.shop.orders.sql.1"} <= names
    pipelines = exporter.pipelines()
    assert {name: p["team"] for name, p in pipelines.items()} == {"shop_dbt": "analytics"}
    assert (pipelines["shop_dbt"]["runs_success"], pipelines["shop_dbt"]["runs_failure"]) == (1, 3)


def test_each_failed_invocation_names_its_failed_model_and_not_the_skipped_one(dbt):
    _, events, failed_children = dbt
    assert any(e["eventType"] == "ABORT" and e["job"]["name"] == "model.shop.after_broken" for e in events)
    assert failed_children == [[name] if name else [] for _, _, name in INVOCATIONS]


def test_duration_and_records_of_the_last_invocation(dbt):
    exporter, events, _ = dbt
    last = exporter.pipeline("shop_dbt")["last_run"]
    assert 0 < last["duration_seconds"] < 120
    assert last["records"] is None  # dbt-duckdb reports no row counts (no outputStatistics facet at all)
    assert not any(o.get("outputFacets", {}).get("outputStatistics") for e in events for o in e.get("outputs", []))


def test_nothing_rejected_and_model_events_counted_as_ignored(dbt):
    exporter, events, _ = dbt
    assert set(exporter.counter("pipemon_events_rejected_total").values()) == {0.0}
    children = [e for e in events if "parent" in e["run"].get("facets", {})]
    assert exporter.counter("pipemon_events_ignored_total")["child_run"] == len(children) > 0
