"""The production rendering (Slack and PagerDuty, secrets read from files) against the real Alertmanager:
the secret files point Slack and PagerDuty at the local sink, which shows the rendered templates."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipemon.model.registry import parse_registry
from pipemon.render.alertmanager import dump_config, render_alertmanager_config
from tests.procs import REPO, free_port, require_binary, running

pytestmark = pytest.mark.slow

REGISTRY = """
teams:
  payments:
    slack_channel: "#payments-alerts"
    slack_webhook_url_file: {secrets}/payments-slack
    pagerduty_routing_key_file: {secrets}/payments-pagerduty
pipelines:
  - match: charge_*
    team: payments
"""
ANNOTATIONS = {
    "summary": "charge_cards failed 3 runs in a row",
    "description": "3 consecutive failures (threshold 3); last error: card gateway timeout",
    "runbook_url": "https://runbooks.example/charge_cards",
    "dashboard_url": "https://grafana.example/d/pipemon?var-pipeline=charge_cards",
}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


@pytest.fixture
def delivered(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Run the sink and one Alertmanager, fire one critical alert, and return what the sink got by path."""
    sink_port, web_port = free_port(), free_port()
    sink = f"http://127.0.0.1:{sink_port}/"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "payments-slack").write_text(f"{sink}slack/payments\n")
    (secrets / "payments-pagerduty").write_text("routing-key-from-file")
    (secrets / "default-slack").write_text(f"{sink}slack/default")
    config = render_alertmanager_config(
        parse_registry(REGISTRY.format(secrets=secrets)), group_wait="1s", group_interval="2s",
        default_slack_webhook_file=str(secrets / "default-slack"), pagerduty_url=f"{sink}pagerduty",
    )
    (tmp_path / "alertmanager.yml").write_text(dump_config(config, "pipelines.yaml"))
    shutil.copytree(REPO / "alertmanager" / "templates", tmp_path / "templates")
    am = [require_binary("prometheus-alertmanager"), f"--config.file={tmp_path / 'alertmanager.yml'}",
          f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web_port}",
          "--cluster.listen-address="]
    with (running([sys.executable, "-m", "pipemon.stack.sink", "--listen", f"127.0.0.1:{sink_port}"],
                  f"{sink}notifications", tmp_path / "sink.log"),
          running(am, f"http://127.0.0.1:{web_port}/-/ready", tmp_path / "am.log")):
        now = datetime.now(UTC)
        alert = {"labels": {"alertname": "PipelineConsecutiveFailures", "pipeline": "charge_cards",
                            "team": "payments", "severity": "critical"},
                 "annotations": ANNOTATIONS, "startsAt": now.isoformat(),
                 "endsAt": (now + timedelta(minutes=5)).isoformat()}
        request = urllib.request.Request(f"http://127.0.0.1:{web_port}/api/v2/alerts", method="POST",
                                         data=json.dumps([alert]).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            by_path = {n["path"]: n["body"] for n in get_json(f"{sink}notifications")}
            if {"/slack/payments", "/pagerduty"} <= set(by_path):
                yield by_path
                return
            time.sleep(0.2)
        pytest.fail(f"not delivered; the sink got {get_json(f'{sink}notifications')}")


def test_slack_message_shows_pipeline_team_severity_figures_and_links(delivered: dict[str, Any]) -> None:
    message = delivered["/slack/payments"]
    assert message["channel"] == "#payments-alerts"
    [attachment] = message["attachments"]
    assert attachment["title"] == "[FIRING:1] CRITICAL PipelineConsecutiveFailures · charge_cards (payments)"
    assert attachment["title_link"] == ANNOTATIONS["dashboard_url"]
    assert attachment["color"] == "danger"
    assert attachment["fallback"] == attachment["title"]
    text = attachment["text"]
    for expected in ("*charge_cards failed 3 runs in a row*", ANNOTATIONS["description"],
                     "*Pipeline:* `charge_cards`", "*Team:* payments", "*Severity:* critical",
                     f"<{ANNOTATIONS['runbook_url']}|Runbook>", f"<{ANNOTATIONS['dashboard_url']}|Dashboard>"):
        assert expected in text


def test_pagerduty_event_has_summary_details_and_dedup_key(delivered: dict[str, Any]) -> None:
    event = delivered["/pagerduty"]
    assert event["routing_key"] == "routing-key-from-file"
    assert event["event_action"] == "trigger"
    assert len(event["dedup_key"]) >= 32  # the hash of the group key: the same on both HA instances
    payload = event["payload"]
    assert payload["summary"] == (
        "PipelineConsecutiveFailures charge_cards (payments): charge_cards failed 3 runs in a row"
    )
    assert payload["severity"] == "critical"
    details = payload["custom_details"]
    assert details["pipeline"] == "charge_cards"
    assert details["runbook"] == ANNOTATIONS["runbook_url"]
    assert details["dashboard"] == ANNOTATIONS["dashboard_url"]
    assert ANNOTATIONS["description"] in details["firing"]
