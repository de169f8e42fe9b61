"""The UI's health states agree with the alerts the real Prometheus fires from the rendered rules.

One exporter (a real process) gets the browser suite's pipelines in every state; Prometheus scrapes it every
second and evaluates pipemon's rules every second. Each state the overview shows must be the alert
Prometheus fires for that pipeline, and no other pipeline alert may fire (PipelineSuccessRateLow, which
has no state of its own on the overview, aside).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipemon.stack.local import write_rules
from tests.procs import REPO, free_port, require_binary, running
from tests.test_web_ui import EXPECTED, REGISTRY, _events

pytestmark = pytest.mark.slow
# overview state -> the alerts that mean it
ALERTS_OF = {"failing": {"PipelineRunFailed", "PipelineConsecutiveFailures"}, "stale": {"PipelineStale"},
             "stuck": {"PipelineRunStuck"}, "slow": {"PipelineDurationAnomaly"},
             "volume_low": {"PipelineVolumeLow"}, "throughput_drop": {"PipelineThroughputDrop"}}
ROW = re.compile(r'<tr data-pipeline="([^"]+)" data-state="([^"]+)"><td>(.*?)</td>')


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _post(url: str, body: object) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def ui_conditions(url: str) -> dict[str, set[str]]:
    html = _get(f"{url}/?per=500")
    return {name: set(re.findall(r'data-state="([^"]+)"', badges)) - {"ok", "never_ran"}
            for name, _state, badges in ROW.findall(html)}


def firing(prometheus: str) -> dict[str, set[str]]:
    body = json.loads(_get(f"{prometheus}/api/v1/alerts"))
    out: dict[str, set[str]] = {}
    for alert in body["data"]["alerts"]:
        if alert["state"] == "firing" and "pipeline" in alert["labels"]:
            out.setdefault(alert["labels"]["pipeline"], set()).add(alert["labels"]["alertname"])
    return out


def test_the_overviews_states_are_the_alerts_prometheus_fires(tmp_path: Path):
    prometheus_bin = require_binary("prometheus")
    port, prom_port = free_port(), free_port()
    url, prometheus = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    (tmp_path / "pipelines.yaml").write_text(REGISTRY)
    write_rules(REPO / "rules" / "config.yaml", tmp_path / "rules", "1s", None)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules" / "*.yml")],
        "scrape_configs": [{"job_name": "pipemon", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    exporter = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--registry",
                str(tmp_path / "pipelines.yaml"), "--state-dir", str(tmp_path / "state"),
                "--abandon-after-factor", "100"]
    with tempfile.TemporaryDirectory() as tsdb, \
            running(exporter, f"{url}/-/healthy", tmp_path / "exporter.log"), \
            running([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tsdb}",
                     f"--web.listen-address=127.0.0.1:{prom_port}"], f"{prometheus}/-/ready",
                    tmp_path / "prometheus.log", timeout=60):
        assert _post(f"{url}/api/v1/runs", _events())["rejected"] == 0
        _post(f"{url}/api/v1/runs/start", {"pipeline": "stuck_pipe", "run_id": "stuck-run",
                                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime(time.time() - 3600))})
        expected = {name: ALERTS_OF.get(state, set()) for name, state in EXPECTED.items()}
        deadline = time.monotonic() + 60
        while True:
            fired = {name: alerts - {"PipelineSuccessRateLow"} for name, alerts in firing(prometheus).items()}
            fired = {name: alerts for name, alerts in fired.items() if alerts}
            # every state the overview expects fires, and nothing else fires
            if all(expected[name] & fired.get(name, set()) for name in expected if expected[name]):
                break
            assert time.monotonic() < deadline, f"Prometheus fires {fired}, the UI's states say {expected}"
            time.sleep(1)
        time.sleep(3)  # a few more evaluations: nothing further fires
        fired = {name: alerts - {"PipelineSuccessRateLow"} for name, alerts in firing(prometheus).items()}
        shown = ui_conditions(url)
        for name in EXPECTED:
            ui = {alert for condition in shown[name] for alert in ALERTS_OF[condition]}
            got = fired.get(name, set())
            assert all(ALERTS_OF[c] & got for c in shown[name]), f"{name}: UI {shown[name]}, Prometheus {got}"
            assert got <= ui, f"{name}: Prometheus fires {got - ui}, the UI shows {shown[name] or 'nothing'}"
