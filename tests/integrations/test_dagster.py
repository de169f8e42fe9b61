"""Dagster 1.13 + dagster-openlineage, for real: the daemon runs the OpenLineage sensor, which tails the event log of
two runs of dagster_project/defs.py's job (a step retried to success in both, a failing step in the second) and
sends them to pipemon. One pipeline for the job; its steps are folded into its runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integrations.common import ndjson, pipemon, process_group, tool_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PROJECT = Path(__file__).parent / "dagster_project"
JOB = "shop_assets_job"


@pytest.fixture(scope="module")
def dagster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagster")
    home, events = tmp / "home", tmp / "openlineage.ndjson"
    home.mkdir()
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    defs = str(PROJECT / "defs.py")
    with pipemon(tmp) as exporter:
        config = tmp / "openlineage.yml"
        config.write_text(json.dumps({"transport": {"type": "composite", "transports": {
            "pipemon": {"type": "http", "url": exporter.url, "endpoint": "api/v1/lineage", "timeout": 5},
            "file": {"type": "file", "log_file_path": str(events), "append": True}}}}))
        env = tool_env("dagster", DAGSTER_HOME=str(home), DAGSTER_EVENT_LOG_DIR=str(home / "history"),
                       OPENLINEAGE_CONFIG=str(config), OPENLINEAGE_NAMESPACE="dagster-test")

        def dagster_cli(*args: str, code: int = 0) -> None:
            done = subprocess.run(["dagster", *args, "-f", defs], env=env, cwd=tmp, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]

        dagster_cli("sensor", "start", "openlineage_sensor")
        with process_group(["dagster-daemon", "run", "-f", defs], tmp / "daemon.log", env, cwd=tmp):
            (tmp / "fail.json").write_text('{"ops": {"maybe_broken": {"config": {"fail": true}}}}')
            dagster_cli("job", "execute", "-j", JOB)
            dagster_cli("job", "execute", "-j", JOB, "-c", str(tmp / "fail.json"), code=1)

            def both_runs_seen() -> bool:
                p = exporter.pipelines().get(JOB)
                return p is not None and p["runs_success"] + p["runs_failure"] == 2

            wait_until(both_runs_seen, 120, "the sensor to report both runs", every=1,
                       diagnose=lambda: f"{exporter.pipelines()}\n{(tmp / 'daemon.log').read_text()[-3000:]}")
        yield exporter, ndjson(events)


def test_one_pipeline_for_the_job_with_its_team_and_outcomes(dagster):
    exporter, events = dagster
    assert {e["job"]["name"] for e in events} >= {JOB, f"{JOB}.flaky", f"{JOB}.maybe_broken"}
    pipelines = exporter.pipelines()
    assert {name: p["team"] for name, p in pipelines.items()} == {JOB: "analytics"}
    assert (pipelines[JOB]["runs_success"], pipelines[JOB]["runs_failure"]) == (1, 1)
    assert pipelines[JOB]["runs_in_progress"] == 0


def test_the_failed_run_names_its_failed_step_and_the_retried_step_is_no_failure(dagster):
    exporter, events = dagster
    flaky = [e["eventType"] for e in events if e["job"]["name"] == f"{JOB}.flaky"]
    assert flaky == ["START", "COMPLETE"] * 2  # a step retried to success is one START/COMPLETE per run
    last = exporter.pipeline(JOB)["last_run"]
    assert last["failed_children"] == [f"{JOB}.maybe_broken"]
    assert 0 < last["duration_seconds"] < 300


def test_nothing_rejected_and_step_events_counted_as_ignored(dagster):
    exporter, events = dagster
    assert set(exporter.counter("pipemon_events_rejected_total").values()) == {0.0}
    steps = [e for e in events if "parent" in e["run"].get("facets", {})]
    assert exporter.counter("pipemon_events_ignored_total")["child_run"] == len(steps) > 0
