"""End to end: `pipemon stack` with the real Prometheus and two clustered Alertmanagers.

Events go in at the exporter; the test waits for notifications at the stack's sink and checks that each
alert kind reaches the owning team's receiver with the right severity, exactly once (two Alertmanagers,
one-hour repeat interval), and that escalation holds back the lower severity.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import REPO, free_port, require_binary, stack_command, wait_http

pytestmark = pytest.mark.slow

REGISTRY = """
unknown_pipelines: accept
teams:
  alpha: {slack_channel: "#alpha"}
  beta: {slack_channel: "#beta"}
pipelines:
  - {match: fail_job, team: alpha}
  - {match: slow_job, team: alpha, expected_interval: 1h}
  - {match: stuck_job, team: alpha, max_runtime: 5s}
  - {match: rate_job, team: beta, expected_interval: 1h}
  - {match: thin_job, team: beta, expected_interval: 1h}
  - {match: tput_job, team: beta, expected_interval: 1h}
  - {match: stale_job, team: beta, expected_interval: 10s}
"""

# (alertname, pipeline, severity) -> the receiver that must get it, once.
EXPECTED = {
    ("PipelineConsecutiveFailures", "fail_job", "critical"): "alpha-pager",
    ("PipelineDurationAnomaly", "slow_job", "high"): "alpha-slack",
    ("PipelineRunStuck", "stuck_job", "high"): "alpha-slack",
    ("PipelineSuccessRateLow", "rate_job", "medium"): "beta-slack",
    ("PipelineVolumeLow", "thin_job", "high"): "beta-slack",
    ("PipelineThroughputDrop", "tput_job", "high"): "beta-slack",
    ("PipelineStale", "stale_job", "high"): "beta-slack",
    ("PipelineRunFailed", "mystery_job", "low"): "default",
    ("PipelineEventsRejected", "", "medium"): "default",
}
# Firing in Prometheus, but inhibited by a more severe alert of the same pipeline, or by the alert that explains
# it (a slow run of the usual records is also a low throughput): never delivered. thin_job's few records in the
# usual time raise no PipelineThroughputDrop at all: its runs are not slow.
HELD_BACK = {("PipelineSuccessRateLow", "fail_job", "high"), ("PipelineDurationAnomaly", "slow_job", "medium"),
             ("PipelineThroughputDrop", "slow_job", "high")}


def http_json(url: str, body: object | None = None, method: str | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def runs(pipeline: str, outcomes: list[tuple[str, float, int | None]], tag: str) -> list[dict]:
    now = time.time()
    return [
        {"pipeline": pipeline, "run_id": f"{tag}-{i}", "status": status, "duration_seconds": duration,
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - len(outcomes) + i)) + "Z",
         **({"records_processed": records} if records is not None else {})}
        for i, (status, duration, records) in enumerate(outcomes)
    ]


def trouble() -> list[dict]:
    """One batch that should raise every pipeline alert kind. The registry says the judged pipelines run
    hourly: a medium duration alert then needs two slow runs in a row, a high one a single run."""
    steady = [("success", 100.0, 1000)] * 11
    return (
        runs("fail_job", [("failure", 5.0, None)] * 5, "f")
        + runs("slow_job", [*steady, *[("success", 1000.0, 1000)] * 3], "s")
        + runs("thin_job", [*steady, *[("success", 100.0, 100)] * 2], "t")
        + runs("tput_job", [*steady, *[("success", 140.0, 600)] * 2], "p")
        + runs("rate_job", [("success", 10.0, None), ("failure", 10.0, None), ("success", 10.0, None)] * 3
               + [("success", 10.0, None)], "r")
        + runs("mystery_job", [("failure", 3.0, None)], "m")
    )


def key(alert: dict) -> tuple[str, str, str]:
    labels = alert["labels"]
    return labels["alertname"], labels.get("pipeline", ""), labels["severity"]


def firing_deliveries(sink: str) -> list[tuple[tuple[str, str, str], str, float]]:
    return [(key(a), n["receiver"], n["received_at"])
            for n in http_json(f"{sink}/notifications") if n["status"] == "firing"
            for a in n["alerts"] if a["status"] == "firing"]


def prometheus_alerts(prom: str) -> set[tuple[str, str, str]]:
    query = urllib.parse.quote('ALERTS{alertstate="firing"}')
    result = http_json(f"{prom}/api/v1/query?query={query}")["data"]["result"]
    return {(r["metric"]["alertname"], r["metric"].get("pipeline", ""), r["metric"]["severity"]) for r in result}


def wait_scraped(prom: str, timeout: float = 30) -> None:
    query = urllib.parse.quote('pipeline_runs_total{pipeline="rate_job"}')
    deadline = time.time() + timeout
    while time.time() < deadline:
        if http_json(f"{prom}/api/v1/query?query={query}")["data"]["result"]:
            return
        time.sleep(0.2)
    raise TimeoutError("Prometheus never scraped the exporter")


def exporter_pid(stack_dir: Path) -> int:
    pattern = f"--state-dir {stack_dir / 'exporter'}"
    found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
    pids = found.stdout.split()
    assert len(pids) == 1, f"expected one exporter process, found {pids}"
    return int(pids[0])


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_events_become_notifications_for_the_right_team(tmp_path: Path) -> None:
    require_binary("/usr/bin/prometheus")
    require_binary("/usr/bin/prometheus-alertmanager")
    registry = tmp_path / "pipelines.yaml"
    registry.write_text(REGISTRY)
    ports = [free_port() for _ in range(7)]
    exporter, prom, sink = (f"http://127.0.0.1:{ports[i]}" for i in (0, 1, 6))
    cmd = stack_command(tmp_path / "stack", registry, ports)
    log = open(tmp_path / "stack.out", "wb")  # noqa: SIM115
    stack = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{prom}/-/ready", 60, stack)
        wait_http(f"{exporter}/-/ready", 10, stack)
        wait_scraped(prom)  # the zero counters are in Prometheus, so increase() will see every run
        sent_at = time.time()
        answer = http_json(f"{exporter}/api/v1/runs", trouble())
        assert answer["rejected"] == 0, answer
        started = http_json(f"{exporter}/api/v1/runs/start", {"pipeline": "stuck_job", "run_id": "x"})
        assert started["status"] == "accepted"
        for i in range(25):  # malformed events: more than 5% of what was received
            http_json(f"{exporter}/api/v1/runs", {"pipeline": "fail_job", "run_id": f"bad{i}"})

        delivered: dict[tuple[str, str, str], tuple[str, float]] = {}
        deadline = time.time() + 90
        while time.time() < deadline and not EXPECTED.keys() <= delivered.keys():
            for k, receiver, at in firing_deliveries(sink):
                delivered.setdefault(k, (receiver, at))
            time.sleep(0.5)
        assert stack.poll() is None, (tmp_path / "stack.out").read_text()[-3000:]
        missing = sorted(set(EXPECTED) - set(delivered))
        assert not missing, f"never delivered: {missing}; delivered: {sorted(delivered)}"
        assert {k: delivered[k][0] for k in EXPECTED} == EXPECTED

        latencies = sorted(delivered[k][1] - sent_at for k in EXPECTED if k[0] not in ("PipelineStale",
                                                                                           "PipelineRunStuck"))
        print(f"\nevent -> notification: median {latencies[len(latencies) // 2]:.1f}s, max {latencies[-1]:.1f}s"
              f" over {len(latencies)} alerts")

        time.sleep(4)  # several group intervals: nothing is sent again within the one-hour repeat interval
        firing_now = prometheus_alerts(prom)
        assert firing_now >= HELD_BACK, f"expected firing in Prometheus: {HELD_BACK - firing_now}"
        final = firing_deliveries(sink)
        counts = {k: sum(1 for d in final if d[0] == k) for k in EXPECTED}
        assert counts == dict.fromkeys(EXPECTED, 1), counts
        assert not HELD_BACK & {d[0] for d in final}, "an inhibited alert was delivered"

        # Last, since it blinds every pipeline alert: a frozen exporter (scrapes time out) pages the default
        # receiver, which is where the exporter's own alerts (team "platform", not a registry team) go.
        frozen_at = time.time()
        with frozen(exporter_pid(tmp_path / "stack")):
            down = ("PipelineExporterDown", "", "critical")
            while time.time() < frozen_at + 30 and down not in {d[0] for d in firing_deliveries(sink)}:
                time.sleep(0.5)
        assert [d[1] for d in firing_deliveries(sink) if d[0] == down] == ["default"]
        print(f"exporter frozen -> PipelineExporterDown delivered in {time.time() - frozen_at:.1f}s")
    finally:
        stack.send_signal(signal.SIGINT)  # what Ctrl-C does
        stack.wait(60)
        log.close()
    assert [p for p in ports if port_open(p)] == [], "a child of the stack is still listening"
