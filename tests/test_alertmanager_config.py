"""The rendered Alertmanager configuration: up to date, valid for amtool, routed as the registry says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipemon.cli import main
from pipemon.model.registry import UNOWNED_TEAM, load_registry, parse_registry
from pipemon.render.alertmanager import (
    HELD_ALERTS,
    SEVERITIES,
    dump_config,
    prometheus_alerting_config,
    receiver_for,
    render_alertmanager_config,
)
from tests.procs import REPO, require_binary

REGISTRY = REPO / "pipelines.yaml"
COMMITTED = REPO / "alertmanager" / "alertmanager.yml"
EXAMPLE_TEAMS = sorted(load_registry(REGISTRY).teams)
TEMPLATE_NAMES = [
    "pipemon.title",
    "pipemon.slack.color",
    "pipemon.slack.title_link",
    "pipemon.slack.text",
    "pipemon.pagerduty.description",
    "pipemon.pagerduty.firing",
]


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("amtool"), *args], capture_output=True, text=True, timeout=30)


def route_test(expected: str, config: Path = COMMITTED, **labels: str) -> subprocess.CompletedProcess[str]:
    label_args = [f"{name}={value}" for name, value in labels.items()]
    return amtool("config", "routes", "test", f"--config.file={config}", f"--verify.receivers={expected}",
                  *label_args)


def rendered_example() -> str:
    return dump_config(render_alertmanager_config(load_registry(REGISTRY)), REGISTRY.name)


def test_committed_file_is_up_to_date() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == rendered_example(), (
        "alertmanager/alertmanager.yml is out of date: run `pipemon render-alertmanager` and commit it"
    )


def test_check_flag_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "alertmanager.yml"
    argv = ["render-alertmanager", f"--registry={REGISTRY}", f"--out={out}"]
    assert main([*argv, "--check"]) == 1  # missing
    assert main(argv) == 0
    assert main([*argv, "--check"]) == 0
    out.write_text(out.read_text() + "# hand edit\n")
    assert main([*argv, "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_amtool_accepts_the_committed_file() -> None:
    result = amtool("check-config", str(COMMITTED))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout  # the template glob resolves next to the file


def test_amtool_accepts_the_sink_rendering(tmp_path: Path) -> None:
    config = render_alertmanager_config(load_registry(REGISTRY), sink_url="http://127.0.0.1:9/",
                                        group_wait="1s", group_interval="2s", repeat_interval="1h")
    path = tmp_path / "alertmanager.yml"
    path.write_text(dump_config(config, "pipelines.yaml"))
    result = amtool("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    receivers = config["receivers"]
    assert all(set(r) == {"name", "webhook_configs"} for r in receivers)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("team", EXAMPLE_TEAMS)
def test_team_and_severity_route_to_the_team_receiver(team: str, severity: str) -> None:
    expected = {"critical": f"{team}-pager", "high": f"{team}-slack", "medium": f"{team}-slack",
                "low": f"{team}-info"}[severity]
    assert receiver_for(team, severity) == expected
    result = route_test(expected, team=team, severity=severity, alertname="PipelineFailing", pipeline="p")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("severity", SEVERITIES)
def test_unowned_goes_to_default(severity: str) -> None:
    result = route_test("default", team=UNOWNED_TEAM, severity=severity, alertname="PipelineFailing",
                        pipeline="mystery_job")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("team", [None, "platform"])  # the exporter alerts say team="platform"
def test_exporter_alert_of_no_registry_team_goes_to_default(team: str | None) -> None:
    labels = {"team": team} if team else {}
    result = route_test("default", alertname="PipelineExporterDown", severity="critical", **labels)
    assert result.returncode == 0, result.stdout + result.stderr


def test_team_alert_with_unknown_severity_still_reaches_the_team() -> None:
    result = route_test("finance-slack", team="finance", severity="bogus", alertname="X", pipeline="p")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("expected", "labels"), [
    ("data-eng-slack", {"team": "data-eng", "severity": "critical"}),
    ("data-eng-pager", {"team": "analytics", "severity": "critical"}),
    ("default", {"team": "finance", "severity": "low"}),
])
def test_a_wrong_expectation_fails(expected: str, labels: dict[str, str]) -> None:
    result = route_test(expected, alertname="X", pipeline="p", **labels)
    assert result.returncode != 0
    assert "did not match" in result.stdout + result.stderr


def test_receivers_per_team() -> None:
    receivers = {r["name"]: r for r in render_alertmanager_config(load_registry(REGISTRY))["receivers"]}
    assert sorted(receivers) == sorted(
        ["default"] + [f"{t}-{kind}" for t in EXAMPLE_TEAMS for kind in ("pager", "slack", "info")]
    )
    assert "pagerduty_configs" in receivers["data-eng-pager"]
    assert "slack_configs" in receivers["data-eng-pager"]
    assert "pagerduty_configs" not in receivers["data-eng-slack"]
    # finance has no PagerDuty key: its critical alerts go to Slack only, through a finance-pager receiver.
    assert set(receivers["finance-pager"]) == {"name", "slack_configs"}
    assert receivers["finance-pager"]["slack_configs"][0]["channel"] == "#finance-data-alerts"
    # ml-platform's generic webhook gets every severity.
    for kind in ("pager", "slack", "info"):
        hooks = receivers[f"ml-platform-{kind}"]["webhook_configs"]
        assert hooks == [{"url": "https://ml-bot.example.com/hooks/pipemon", "send_resolved": True}]


def test_dedup_and_repeat_intervals() -> None:
    route = render_alertmanager_config(load_registry(REGISTRY))["route"]
    assert route["group_by"] == ["alertname", "team", "pipeline"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("30s", "5m", "1h")
    team_routes = [r for r in route["routes"] if r["matchers"][0].startswith("team=")]
    assert len(team_routes) == len(EXAMPLE_TEAMS)
    for team_route in team_routes:
        info = [r for r in team_route["routes"] if r["receiver"].endswith("-info")]
        assert [r["repeat_interval"] for r in info] == ["24h"]


def held_routes(node: dict) -> list[dict]:
    """Every route of the tree that matches the held alerts only."""
    own = [node] if any("PipelineSuccessRateLow" in m for m in node.get("matchers", [])) else []
    return own + [r for child in node.get("routes", []) for r in held_routes(child)]


def test_rate_alerts_are_held_for_an_hour_and_reminded_hourly_for_every_team_and_unowned() -> None:
    held = held_routes(render_alertmanager_config(load_registry(REGISTRY))["route"])
    assert len(held) == 2 * len(EXAMPLE_TEAMS) + 1  # pager and slack of each team, and the default receiver
    for route in held:
        assert route["matchers"] == [f'alertname=~"{"|".join(HELD_ALERTS)}"']
        assert route["group_by"] == ["alertname", "team", "pipeline", "severity"]
        assert (route["group_interval"], route["repeat_interval"]) == ("1h", "59m")


@pytest.mark.parametrize(("alertname", "severity", "team", "expected"), [
    ("PipelineSuccessRateLow", "medium", "finance", "finance-slack"),
    ("PipelineSuccessRateLow", "high", "analytics", "analytics-slack"),
    ("PipelineConsecutiveFailures", "critical", "data-eng", "data-eng-pager"),
    ("PipelineConsecutiveFailures", "critical", UNOWNED_TEAM, "default"),
])
def test_held_alerts_still_reach_the_receiver_of_their_team_and_severity(
        alertname: str, severity: str, team: str, expected: str) -> None:
    result = route_test(expected, alertname=alertname, severity=severity, team=team, pipeline="p")
    assert result.returncode == 0, result.stdout + result.stderr


def test_held_alerts_are_alerts_of_the_rule_files() -> None:
    rules = yaml.safe_load((REPO / "rules" / "pipemon.alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert set(HELD_ALERTS) <= names


def test_inhibition_escalates_within_one_team_and_pipeline() -> None:
    rules = render_alertmanager_config(load_registry(REGISTRY))["inhibit_rules"]
    silenced = {r["source_matchers"][0]: r["target_matchers"] for r in rules}
    assert silenced == {
        'severity="critical"': ['severity=~"high|medium|low"'],
        'severity="high"': ['severity=~"medium|low"'],
        'severity="medium"': ['severity=~"low"'],
        # one cause, one alert: what explains a low throughput holds it back
        'alertname=~"PipelineDurationAnomaly|PipelineVolumeLow"': ['alertname="PipelineThroughputDrop"'],
        # a run in progress too slow by its age is what a stuck run is, told earlier
        'alertname="PipelineDurationAnomaly"': ['alertname="PipelineRunStuck"'],
    }
    for rule in rules:
        assert rule["equal"] == ["team", "pipeline"]
        # Missing `equal` labels compare equal: a pipeline-less source would silence all pipeline-less alerts.
        assert 'pipeline!=""' in rule["source_matchers"]


SECRET_REGISTRY = """
teams:
  payments:
    slack_channel: "#payments"
    slack_webhook_url_file: {slack}
    pagerduty_routing_key_file: {pd}
pipelines:
  - match: charge_*
    team: payments
"""


def test_secrets_are_never_rendered(tmp_path: Path) -> None:
    slack, pd = tmp_path / "slack", tmp_path / "pd"
    slack.write_text("https://hooks.slack.com/services/T000/B000/SUPERSECRET-SLACK")
    pd.write_text("SUPERSECRET-PAGERDUTY-KEY")
    registry = parse_registry(SECRET_REGISTRY.format(slack=slack, pd=pd))
    text = dump_config(render_alertmanager_config(registry), "pipelines.yaml")
    assert "SUPERSECRET" not in text
    assert f"api_url_file: {slack}" in text
    assert f"routing_key_file: {pd}" in text


def test_example_holds_only_secret_file_paths() -> None:
    def keys(node: object) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        if isinstance(node, list):
            return {k for v in node for k in keys(v)}
        return set()

    found = keys(yaml.safe_load(COMMITTED.read_text()))
    assert not found & {"api_url", "routing_key", "service_key", "slack_api_url", "pagerduty_url"}
    assert {"api_url_file", "routing_key_file"} <= found


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_templates_render(name: str) -> None:
    result = amtool("template", "render", f"--template.glob={REPO / 'alertmanager' / 'templates' / '*.tmpl'}",
                    f'--template.text={{{{ template "{name}" . }}}}')
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_alerting_config_lists_both_instances(tmp_path: Path) -> None:
    config = prometheus_alerting_config(["127.0.0.1:9093", "127.0.0.1:9193"])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([require_binary("promtool"), "check", "config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9093", "127.0.0.1:9193"]


def test_committed_prometheus_snippet_lists_both_instances() -> None:
    snippet = yaml.safe_load((REPO / "alertmanager" / "prometheus-alerting.yml").read_text())
    expected = prometheus_alerting_config(["alertmanager-1:9093", "alertmanager-2:9093"])
    assert snippet == expected


def test_bad_interval_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render-alertmanager", f"--registry={REGISTRY}", "--out=-", "--group-wait=soon"]) == 1
    assert "duration" in capsys.readouterr().err


def test_a_held_interval_longer_than_the_cooldown_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render-alertmanager", f"--registry={REGISTRY}", "--out=-", "--repeat-interval=1h"]
    assert main([*argv, "--held-group-interval=2h"]) == 1
    err = capsys.readouterr().err
    assert "held group interval 2h: must be more than 0s and at most the repeat interval (1h)" in err
    assert main([*argv, "--held-group-interval=1h"]) == 0
