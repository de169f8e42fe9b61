"""Prometheus rules: rendered from rules/config.yaml, valid for promtool, and proven by promtool unit tests."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipemon.model.registry import THRESHOLD_NAMES
from pipemon.render import rules as rules_render
from tests.procs import REPO, require_binary

RULES_DIR = REPO / "rules"
CONFIG = RULES_DIR / "config.yaml"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((REPO / "tests" / "rules").glob("*.test.yml"))
ALERT_NAMES = {
    "PipelineSuccessRateLow", "PipelineDurationAnomaly", "PipelineThroughputDrop", "PipelineVolumeLow",
    "PipelineRunFailed",
    "PipelineConsecutiveFailures", "PipelineStale", "PipelineRunStuck", "PipelineExporterDown",
    "PipelineEventsRejected",
}


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("/usr/bin/promtool")
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def _alerts() -> list[dict]:
    groups = yaml.safe_load((RULES_DIR / rules_render.ALERTS_FILE).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rule_files_are_rendered() -> None:
    assert {p.name for p in RULE_FILES} == {rules_render.RECORDING_FILE, rules_render.ALERTS_FILE}


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(path: Path) -> None:
    result = _promtool("test", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_test() -> None:
    tested = set()
    for path in TEST_FILES:
        tested |= set(re.findall(r"alertname: (\w+)", path.read_text()))
    assert tested >= ALERT_NAMES


def test_committed_rules_are_up_to_date() -> None:
    rendered = rules_render.render(rules_render.load_config(CONFIG))
    stale = rules_render.stale_files(rendered, RULES_DIR)
    assert not stale, f"out of date: {stale}; run `pipemon render-rules`"


def test_check_mode_names_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(config=str(CONFIG), out_dir=str(tmp_path), check=True)
    assert rules_render.run(args) == 1
    assert rules_render.ALERTS_FILE in capsys.readouterr().err
    args.check = False
    assert rules_render.run(args) == 0
    args.check = True
    assert rules_render.run(args) == 0
    (tmp_path / rules_render.RECORDING_FILE).write_text("groups: []\n")
    assert rules_render.run(args) == 1
    err = capsys.readouterr().err
    assert rules_render.RECORDING_FILE in err and rules_render.ALERTS_FILE not in err


def test_config_threshold_names_match_the_registry() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert tuple(config["thresholds"]) == THRESHOLD_NAMES


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["thresholds"].pop("min_runs"), "missing: min_runs"),
        (lambda c: c["thresholds"].update(min_runz=5), "unknown: min_runz"),
        (lambda c: c["thresholds"].update(success_ratio_high=1.5), "$.thresholds.success_ratio_high"),
        (lambda c: c["for"].update(PipelineStale="soon"), "$.for.PipelineStale"),
        (lambda c: c.update(extra=1), "unknown field `extra`"),
        (lambda c: c["schedule_classes"].reverse(), "longest first"),
        (lambda c: c["schedule_classes"][0].update(runs_high=4), "$.schedule_classes[0].runs_high"),
        (lambda c: c["schedule_classes"][0].update(success_window=20), "$.schedule_classes[0].success_window"),
        (lambda c: c.update(dashboard_interval="45m"), "$.dashboard_windows"),
    ],
)
def test_invalid_config_is_rejected_clearly(tmp_path: Path, change, message: str) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(rules_render.ConfigError) as exc:
        rules_render.load_config(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_every_alert_is_annotated_and_labelled() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == ALERT_NAMES
    for alert in alerts:
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url", "dashboard_url"}, alert
        assert alert["annotations"]["runbook_url"].endswith(f"docs/alerts.md#{alert['alert'].lower()}")
        assert alert["labels"]["severity"] in rules_render.SEVERITIES
        assert set(alert["labels"]) <= {"severity", "team"}
        assert "{{" not in alert["annotations"]["summary"], "summary is a static sentence"


def test_severities_follow_the_issue_table() -> None:
    severities = {(a["alert"], a["labels"]["severity"]) for a in _alerts()}
    assert severities == {
        ("PipelineSuccessRateLow", "medium"), ("PipelineSuccessRateLow", "high"),
        ("PipelineDurationAnomaly", "medium"), ("PipelineDurationAnomaly", "high"),
        ("PipelineThroughputDrop", "high"), ("PipelineVolumeLow", "high"), ("PipelineRunFailed", "low"),
        ("PipelineConsecutiveFailures", "critical"), ("PipelineStale", "high"), ("PipelineRunStuck", "high"),
        ("PipelineExporterDown", "critical"), ("PipelineEventsRejected", "medium"),
    }


def test_docs_have_an_anchor_for_every_alert() -> None:
    docs = (REPO / "docs" / "alerts.md").read_text()
    headings = {line.removeprefix("## ").strip() for line in docs.splitlines() if line.startswith("## ")}
    assert headings >= ALERT_NAMES


def test_for_durations_come_from_the_config() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    for alert in _alerts():
        assert alert["for"] == rules_render.format_duration(rules_render.parse_duration(config["for"][alert["alert"]]))


def test_cli_render_rules_check_passes_on_the_committed_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipemon.cli import main

    monkeypatch.chdir(REPO)
    assert main(["render-rules", "--check"]) == 0


def test_dashboard_windows_evaluate_apart_from_what_the_alerts_read() -> None:
    """The day-long windows sit in their own slower group and read only the recorded counter, so however long
    they take no 1-minute group (what the alerts read) waits for them."""
    groups = {g["name"]: g for g in yaml.safe_load((RULES_DIR / rules_render.RECORDING_FILE).read_text())["groups"]}
    dashboards = groups.pop("pipemon.dashboards")
    assert dashboards["interval"] == "5m" and all(g["interval"] == "1m" for g in groups.values())
    for rule in dashboards["rules"][1:]:
        assert "pipeline_runs_total{" not in rule["expr"], rule  # only the first rule reads the raw counter
    for group in groups.values():
        for rule in group["rules"]:
            assert not re.search(r"\[\d+[hd]\]", rule["expr"]), rule  # no long window at 1m


def test_thresholds_cost_no_series_per_pipeline() -> None:
    """Each threshold is compared with the registry's override where one is set and with the default as a
    scalar elsewhere: no recording holds a threshold per pipeline, and every override read has its default
    path (`... unless on (pipeline, team) <override>`)."""
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert not [r["record"] for g in groups for r in g["rules"] if "alert_threshold" in r.get("record", "")]
    exprs = "\n".join(r["expr"] for g in groups for r in g["rules"])
    names = set(re.findall(r'pipeline_alert_threshold\{job="pipemon",threshold="(\w+)"\}', exprs))
    assert len(names) >= 14
    for name in names - {"stale_grace_factor"}:  # the grace: override - 1 or default - 1, times the interval
        override = f'max by (pipeline, team) (pipeline_alert_threshold{{job="pipemon",threshold="{name}"}})'
        assert f" unless on (pipeline, team) {override})" in exprs, name
