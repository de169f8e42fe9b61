"""Guarantee 6, monitoring stays up when its parts fail: with the real stack (exporter, Prometheus, two clustered
Alertmanagers, the sink), Prometheus killed and restarted sends no duplicate notification within the repeat
interval, and the exporter killed (-9) and restarted raises no false alert (its own counters restart at 0, the
pipeline counters come back from its state). One Alertmanager killed: tests/test_alertmanager_cluster.py
(test_the_survivor_delivers_after_a_kill), not repeated here."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipemon.stack import local as pstack
from tests.fault.common import request, wait_until
from tests.procs import REPO, free_port, require_binary

pytestmark = [pytest.mark.fault, pytest.mark.slow]

REGISTRY = """
unknown_pipelines: accept
teams:
  alpha: {slack_channel: "#alpha"}
pipelines:
  - {match: fail_job, team: alpha}
  - {match: ok_job, team: alpha}
"""
# Several group intervals (1s) and evaluation intervals (1s): a duplicate would have been sent by then.
QUIET = 10


def firing(sink: str) -> Counter:
    with urllib.request.urlopen(f"{sink}/notifications", timeout=5) as resp:
        notes = json.load(resp)
    return Counter((a["labels"]["alertname"], a["labels"].get("pipeline", ""), a["labels"]["severity"])
                   for n in notes if n["status"] == "firing" for a in n["alerts"] if a["status"] == "firing")


def run(pipeline: str, run_id: str, status: str) -> dict:
    return {"pipeline": pipeline, "run_id": run_id, "status": status, "duration_seconds": 3.0}


def restart(st: pstack.Stack, name: str, sig: int, ready_url: str) -> float:
    """Kill one child of the stack and start it again with the same command; returns the downtime."""
    index, proc = next((i, p) for i, (n, p) in enumerate(st.processes) if n == name and p.poll() is None)
    started = time.monotonic()
    os.kill(proc.pid, sig)
    proc.wait(30)
    st.processes.pop(index)
    st.start(name, list(proc.args), ready_url)
    return time.monotonic() - started


def test_prometheus_and_exporter_restarts_send_no_duplicate_and_no_false_alert(tmp_path: Path) -> None:
    """The rules' keep_firing_for (rules/config.yaml) carries pipeline alerts over the exporter's restart gap."""
    require_binary("/usr/bin/prometheus")
    require_binary("/usr/bin/prometheus-alertmanager")
    registry = tmp_path / "pipelines.yaml"
    registry.write_text(REGISTRY)
    ports = pstack.StackPorts(free_port(), free_port(), (free_port(), free_port()), (free_port(), free_port()),
                              free_port())
    exporter, prom, sink = (f"http://127.0.0.1:{p}" for p in (ports.exporter, ports.prometheus, ports.sink))
    args = argparse.Namespace(
        rules_config=REPO / "rules" / "config.yaml", templates=REPO / "alertmanager" / "templates",
        # max_for 20s: PipelineExporterDown (for: 5m) must not fire while a loaded CI machine times out a few
        # 1 s scrapes, or a Prometheus restart would re-send it; the pipeline alerts here have for: 0s
        scrape_interval="1s", evaluation_interval="1s", max_for="20s", group_wait="1s", group_interval="1s",
        repeat_interval="1h")
    directory = tmp_path / "stack"
    directory.mkdir()
    st = pstack.Stack(directory)
    try:
        pstack.start_stack(args, ports, st, registry)
        wait_until(lambda: request(f"{prom}/api/v1/query?query=pipeline_runs_total")[1]["data"]["result"], 30,
                   "the first scrape")
        # Trouble that must page once: five failures in a row. And a healthy pipeline beside it.
        status, body = request(f"{exporter}/api/v1/runs", [run("fail_job", f"f{i}", "failure") for i in range(5)]
                               + [run("ok_job", f"o{i}", "success") for i in range(5)])
        assert status == 200 and body["accepted"] == 10, body
        key = ("PipelineConsecutiveFailures", "fail_job", "critical")
        wait_until(lambda: firing(sink)[key], 60, f"{key} delivered")
        time.sleep(QUIET)
        delivered = firing(sink)
        assert delivered[key] == 1 and max(delivered.values()) == 1, delivered

        # Prometheus killed and restarted on its own data: the alert fires again in Prometheus and is sent to
        # both Alertmanagers again, which already notified: nothing new reaches the receiver.
        down = restart(st, "prometheus", signal.SIGKILL, f"{prom}/-/ready")
        wait_until(lambda: any(r["metric"]["alertname"] == key[0] for r in request(
            f"{prom}/api/v1/query?query=ALERTS%7Balertstate%3D%22firing%22%7D")[1]["data"]["result"]), 60,
            "the alert firing again after the restart")
        time.sleep(QUIET)
        after_prom = firing(sink)
        assert after_prom == delivered, f"after a Prometheus restart: {after_prom - delivered} sent again"

        # The exporter killed (-9) and restarted: its pipemon_* counters restart at 0, pipeline counters come
        # back from SQLite. Healthy runs keep coming; no alert may fire that did not fire before.
        for i in range(3):
            request(f"{exporter}/api/v1/runs", run("ok_job", f"before{i}", "success"))
        down_exporter = restart(st, "exporter", signal.SIGKILL, f"{exporter}/-/ready")
        for i in range(3):
            status, _ = request(f"{exporter}/api/v1/runs", run("ok_job", f"after{i}", "success"))
            assert status == 200
        time.sleep(QUIET)
        after_exporter = firing(sink)
        assert after_exporter == delivered, f"after an exporter restart: {after_exporter - delivered} new"
        query = "ALERTS%7Balertstate%3D%22firing%22%7D"
        now_firing = {r["metric"]["alertname"] for r in request(f"{prom}/api/v1/query?query={query}")[1]["data"]
                      ["result"]}
        assert "PipelineExporterDown" not in now_firing
        assert st.exited() is None, st.exited()
        print(f"\nnotifications: {dict(delivered)}; Prometheus down {down:.1f}s: 0 duplicates; exporter down"
              f" {down_exporter:.1f}s: 0 false alerts")
    finally:
        st.stop()
