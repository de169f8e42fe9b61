"""Grafana dashboards: committed JSON is the generator's output, queries follow the conventions, provisioning
points at real paths, and every panel query returns data from a real Prometheus scraping a real exporter."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.procs import REPO, free_port, require_binary, running

GRAFANA = REPO / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
UIDS = {"pipemon-overview", "pipemon-pipeline", "pipemon-exporter"}
RANGE_SELECTOR = re.compile(r"\[([^\]]*)\]")
RATE_CALL = re.compile(r"\b(rate|irate|increase|delta|idelta|deriv)\s*\(")
RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pipemon_grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    """uid → committed dashboard JSON."""
    boards = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARDS.glob("*.json"))]
    return {board["uid"]: board for board in boards}


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of a dashboard."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel, target


def all_exprs() -> list[tuple[str, str, str]]:
    return [(uid, panel["title"], target["expr"]) for uid, board in committed().items()
            for panel, target in targets(board)]


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def host_path_for(service: str, container_path: str) -> Path | None:
    """The repo path that docker-compose.yml bind-mounts at `container_path` (or a parent of it) in `service`."""
    for volume in compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return REPO / source / container_path[len(target):].lstrip("/")
    return None


# ---- the generator and the committed JSON -------------------------------------------------------------


def test_committed_json_matches_the_generator():
    generator = load_generator()
    rendered = generator.render_all()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in DASHBOARDS.glob("*.json")}
    assert set(on_disk) == set(rendered), "grafana/dashboards/ holds exactly the generated files"
    stale = [name for name, text in rendered.items() if on_disk[name] != text]
    assert not stale, f"out of date: {stale}; run `python grafana/generate.py`"


def test_generator_check_mode_detects_a_stale_file(tmp_path):
    generator = load_generator()
    generator.write_all(tmp_path)
    assert generator.stale_files(tmp_path) == []
    edited = tmp_path / "pipemon-overview.json"
    edited.write_text(edited.read_text().replace('"pipemon-overview"', '"renamed"'))
    assert generator.stale_files(tmp_path) == ["pipemon-overview.json"]


def test_every_dashboard_has_its_fixed_uid_in_a_file_named_after_it():
    boards = committed()
    assert set(boards) == UIDS
    for uid in UIDS:
        assert json.loads((DASHBOARDS / f"{uid}.json").read_text())["uid"] == uid


def test_every_dashboard_has_a_prometheus_datasource_variable_used_by_every_query():
    for uid, board in committed().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", uid
        assert variables["datasource"]["query"] == "prometheus", uid
        for panel, target in targets(board):
            for ref in (panel["datasource"], target["datasource"]):
                assert ref == {"type": "prometheus", "uid": "${datasource}"}, (uid, panel["title"])


def test_every_rate_and_increase_uses_rate_interval():
    offenders = []
    for uid, title, expr in all_exprs():
        windows = RANGE_SELECTOR.findall(expr)
        calls = RATE_CALL.findall(expr)
        if any(window != "$__rate_interval" for window in windows) or len(calls) > len(windows):
            offenders.append(f"{uid} / {title}: {expr}")
    assert not offenders, "\n".join(offenders)


def test_recording_rules_used_by_the_dashboards_exist():
    recorded = {rule["record"] for path in (REPO / "rules").glob("*.yml")
                for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "record" in rule}
    missing = {f"{name} ({uid} / {title})" for uid, title, expr in all_exprs()
               for name in RECORDED_NAME.findall(expr) if name not in recorded}
    assert not missing, f"not recorded by rules/*.yml: {sorted(missing)}"


def test_pipeline_dashboard_has_pipeline_and_team_variables():
    variables = {v["name"]: v for v in committed()["pipemon-pipeline"]["templating"]["list"]}
    assert variables["pipeline"]["query"] == "label_values(pipeline_info, pipeline)"
    assert variables["team"]["query"] == 'label_values(pipeline_info{pipeline="$pipeline"}, team)'
    for _, title, expr in (e for e in all_exprs() if e[0] == "pipemon-pipeline"):
        assert 'pipeline="$pipeline"' in expr, title


def test_alert_dashboard_links_point_at_the_pipeline_dashboard():
    alerts = (REPO / "rules" / "pipemon.alerts.yml").read_text()
    assert "/d/pipemon-pipeline/" in alerts and "var-pipeline=" in alerts


def test_panels_have_unique_ids_and_fit_the_grid():
    for uid, board in committed().items():
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), uid
        for panel in panels(board):
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (uid, panel["title"])


# ---- provisioning ------------------------------------------------------------------------------------


def test_provisioning_directories_are_mounted_where_grafana_reads_them():
    for kind in ("datasources", "dashboards"):
        path = host_path_for("grafana", f"/etc/grafana/provisioning/{kind}")
        assert path == GRAFANA / "provisioning" / kind and any(path.glob("*.yml")), kind


def test_dashboard_provider_points_at_the_mounted_dashboard_json():
    for config_file in (GRAFANA / "provisioning" / "dashboards").glob("*.yml"):
        for provider in yaml.safe_load(config_file.read_text())["providers"]:
            host = host_path_for("grafana", provider["options"]["path"])
            assert host is not None and host.resolve() == DASHBOARDS.resolve(), provider
            assert {p.stem for p in host.glob("*.json")} == UIDS


def test_datasource_points_at_the_compose_prometheus():
    services = compose()["services"]
    for config_file in (GRAFANA / "provisioning" / "datasources").glob("*.yml"):
        sources = yaml.safe_load(config_file.read_text())["datasources"]
        assert [s["type"] for s in sources] == ["prometheus"]
        host = urllib.parse.urlsplit(sources[0]["url"]).hostname
        assert host in services


def test_datasource_time_interval_is_the_scrape_interval():
    """Grafana's $__rate_interval is at least 4x the datasource's scrape interval: keep it the real one."""
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    deploy = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == deploy["global"]["scrape_interval"]


def test_home_dashboard_is_a_mounted_file():
    path = compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host = host_path_for("grafana", path)
    assert host is not None and host.is_file()


# ---- every panel query against a real Prometheus -----------------------------------------------------

DRILL_PIPELINE, DRILL_TEAM = "orders_daily", "data-eng"
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "2s", "$__range": "1m",
                 "$pipeline": DRILL_PIPELINE, "$team": DRILL_TEAM}


def http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return {"http_status": exc.code, "body": exc.read().decode(errors="replace")}


def promql(prom: str, expr: str, start: float | None = None) -> dict[str, Any]:
    """Run `expr` as an instant query, or as a range query from `start` to now."""
    if start is None:
        return http_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{time.time():.3f}", "step": "1"}
    return http_json(f"{prom}/api/v1/query_range?" + urllib.parse.urlencode(params))


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def write_rules(directory: Path) -> None:
    """The repo's rules/*.yml, with every group evaluated each second instead of each minute."""
    directory.mkdir()
    for path in (REPO / "rules").glob("*.yml"):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        (directory / path.name).write_text(yaml.safe_dump(rules, sort_keys=False))


def write_prometheus_config(tmp: Path, exporter_port: int) -> Path:
    """deploy/prometheus.yml, scraping our exporter every second; no Alertmanagers."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(tmp / "rules" / "*.yml")]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "pipemon"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    config.pop("alerting")
    write_rules(tmp / "rules")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def finished(pipeline: str, run_id: str, status: str = "success", duration: float = 100.0,
             records: int | None = 10_000) -> dict[str, Any]:
    run = {"pipeline": pipeline, "run_id": run_id, "status": status, "duration_seconds": duration}
    if records is not None:
        run["records_processed"] = records
    return run


def first_wave() -> list[dict[str, Any]]:
    """Baselines for every team; the drill-down pipeline gets a steady history of twelve runs."""
    runs = [finished(DRILL_PIPELINE, f"od-{i}", duration=95.0 + (i % 3) * 5) for i in range(12)]
    runs += [finished("customers_hourly", f"ch-{i}", duration=30.0 + i) for i in range(4)]
    runs += [finished("dbt_marts_nightly", f"dbt-{i}", duration=600.0, records=None) for i in range(3)]
    runs += [finished("features_user_daily", f"feat-{i}", duration=300.0, records=5_000) for i in range(3)]
    runs += [finished("ledger_reconcile", "ledger-0", duration=20.0, records=100)]
    return runs


def second_wave() -> list[dict[str, Any]]:
    """After Prometheus has seen the first: a slow run, failures, three failures in a row, an unowned pipeline."""
    runs = [finished(DRILL_PIPELINE, "od-slow", duration=400.0),
            finished(DRILL_PIPELINE, "od-failed", status="failure", duration=12.0, records=0),
            finished(DRILL_PIPELINE, "od-recovered", duration=420.0)]
    runs += [finished("customers_hourly", "ch-fail", status="failure", duration=3.0, records=0),
             finished("customers_hourly", "ch-9", duration=31.0)]
    runs += [finished("ledger_reconcile", f"ledger-fail-{i}", status="failure", duration=5.0, records=0)
             for i in range(3)]
    runs += [finished("dbt_marts_nightly", "dbt-9", duration=610.0, records=None),
             finished("features_user_daily", "feat-9", duration=310.0, records=5_100),
             finished("adhoc_backfill", "adhoc-1", duration=50.0, records=10)]
    return runs


def send_traffic(exporter: str, prom: str) -> None:
    wait_for(prom, 'up{job="pipemon"} == 1', 15)
    assert http_json(f"{exporter}/api/v1/runs", first_wave())["results"]
    http_json(f"{exporter}/api/v1/runs/start", {"pipeline": DRILL_PIPELINE, "run_id": "od-running"})
    wait_for(prom, f'pipeline_baseline_samples{{pipeline="{DRILL_PIPELINE}"}} >= 11', 15)
    assert http_json(f"{exporter}/api/v1/runs", second_wave())["results"]
    rejected = http_json(f"{exporter}/api/v1/runs", {"pipeline": DRILL_PIPELINE, "run_id": "bad", "status": "maybe"})
    assert rejected.get("http_status", 200) >= 400, rejected


def wait_for(prom: str, expr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if promql(prom, expr).get("data", {}).get("result"):
            return
        time.sleep(0.25)
    raise TimeoutError(f"{expr} returned nothing within {timeout}s")


def panel_queries() -> list[tuple[str, str, bool]]:
    """(label, expr with variables substituted, is a range query) for every panel target."""
    return [(f"{uid} / {panel['title']} / {target['refId']}", substitute(target["expr"]), not target.get("instant"))
            for uid, board in sorted(committed().items()) for panel, target in targets(board)]


def problems(prom: str, start: float) -> list[str]:
    """Every panel query that errors or returns nothing."""
    found = []
    for label, expr, is_range in panel_queries():
        answer = promql(prom, expr, start if is_range else None)
        if answer.get("status") != "success":
            found.append(f"{label}: error {answer}\n    {expr}")
        elif not answer["data"]["result"]:
            found.append(f"{label}: no data\n    {expr}")
    return found


def variable_values(prom: str, label: str, match: str) -> list[str]:
    query = urllib.parse.urlencode({"match[]": match})
    return http_json(f"{prom}/api/v1/label/{label}/values?{query}")["data"]


@pytest.mark.slow
def test_every_panel_query_returns_data(tmp_path):
    prometheus = require_binary("/usr/bin/prometheus")
    exporter_port, prom_port = free_port(), free_port()
    exporter, prom = f"http://127.0.0.1:{exporter_port}", f"http://127.0.0.1:{prom_port}"
    exporter_cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{exporter_port}",
                    "--registry", str(REPO / "pipelines.yaml"), "--state-dir", str(tmp_path / "state")]
    prom_cmd = [prometheus, f"--config.file={write_prometheus_config(tmp_path, exporter_port)}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"]
    with running(exporter_cmd, f"{exporter}/-/ready", tmp_path / "exporter.log"), \
            running(prom_cmd, f"{prom}/-/ready", tmp_path / "prometheus.log", timeout=30):
        start = time.time()
        send_traffic(exporter, prom)
        wait_for(prom, 'ALERTS{alertname="PipelineConsecutiveFailures",alertstate="firing"}', 20)
        deadline = time.monotonic() + 20
        while (found := problems(prom, start)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not found, f"{len(found)} of {len(panel_queries())} panel queries failed:\n" + "\n".join(found)
        assert DRILL_PIPELINE in variable_values(prom, "pipeline", "pipeline_info")
        assert variable_values(prom, "team", f'pipeline_info{{pipeline="{DRILL_PIPELINE}"}}') == [DRILL_TEAM]
