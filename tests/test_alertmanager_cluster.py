"""End to end with the real Alertmanager: two clustered instances, alerts posted to both like Prometheus
does, notifications caught by the pipemon sink. Short intervals: group_wait 1s, group_interval 2s, repeat 1h,
and the held alerts' group_interval 8s."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipemon.model.registry import load_registry
from pipemon.render.alertmanager import alertmanager_command, dump_config, render_alertmanager_config
from tests.procs import REPO, free_port, require_binary, running

pytestmark = pytest.mark.slow

PEER_TIMEOUT = 1.0  # seconds the second instance waits for the first one's notification log
DELIVERY = 10.0  # the longest a first delivery may take (group_wait 1s, then at most one peer timeout)
# After the first delivery, a duplicate from the other instance would come within one peer timeout.
QUIET = 2 * PEER_TIMEOUT + 1.0
HELD = 8.0  # group_interval of the held alerts (1h in production)


@dataclass
class Sink:
    url: str

    def notifications(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}notifications", timeout=5) as resp:
            return json.load(resp)

    def for_pipeline(self, pipeline: str) -> list[dict[str, Any]]:
        return [n for n in self.notifications() if any(a["labels"].get("pipeline") == pipeline for a in n["alerts"])]

    def for_alertname(self, alertname: str) -> list[dict[str, Any]]:
        return [n for n in self.notifications() if any(a["labels"]["alertname"] == alertname for a in n["alerts"])]


@dataclass
class Instance:
    api: str
    proc: Any

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.api}/api/v2/status", timeout=5) as resp:
            return json.load(resp)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alert(alertname: str, severity: str, pipeline: str | None = None, team: str | None = None,
          **extra: str) -> dict[str, Any]:
    labels = {"alertname": alertname, "severity": severity, **extra}
    labels |= {k: v for k, v in (("pipeline", pipeline), ("team", team)) if v}
    now = datetime.now(UTC)
    return {
        "labels": labels,
        "annotations": {"summary": f"{alertname} on {pipeline}", "description": "success ratio 0.42 < 0.80"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=5)).isoformat(),  # Prometheus re-sends and extends this
    }


def resolved(firing: dict[str, Any]) -> dict[str, Any]:
    """The alert as Prometheus sends it once its condition no longer holds: ended now."""
    return firing | {"endsAt": datetime.now(UTC).isoformat()}


def post_alerts(instances: list[Instance], alerts: list[dict[str, Any]]) -> None:
    """POST /api/v2/alerts to every live instance, as Prometheus does with all its Alertmanagers."""
    body = json.dumps(alerts).encode()
    for instance in instances:
        if instance.proc.poll() is not None:
            continue
        request = urllib.request.Request(f"{instance.api}/api/v2/alerts", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200


def cluster_ready(instances: list[Instance]) -> bool:
    try:
        statuses = [i.status()["cluster"] for i in instances]
    except (urllib.error.URLError, OSError):
        return False
    return all(s["status"] == "ready" and len(s.get("peers", [])) == len(instances) for s in statuses)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("am")


@pytest.fixture(scope="module")
def sink(workdir: Path) -> Iterator[Sink]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipemon.stack.sink", "--listen", f"127.0.0.1:{port}"]
    with running(cmd, f"{url}notifications", workdir / "sink.log", env=env):
        yield Sink(url)


@contextlib.contextmanager
def am_cluster(workdir: Path, sink: Sink, name: str, size: int = 2) -> Iterator[list[Instance]]:
    """`size` Alertmanagers gossiping with each other, with a sink-url config rendered from the registry."""
    binary = require_binary("prometheus-alertmanager")
    config = workdir / f"{name}.yml"
    rendered = render_alertmanager_config(load_registry(REPO / "pipelines.yaml"), sink_url=sink.url,
                                          group_wait="1s", group_interval="2s", repeat_interval="1h",
                                          held_group_interval=f"{HELD:g}s")
    config.write_text(dump_config(rendered, "pipelines.yaml"))
    web = [free_port() for _ in range(size)]
    gossip = [f"127.0.0.1:{free_port()}" for _ in range(size)]
    with contextlib.ExitStack() as stack:
        instances = []
        for i in range(size):
            storage = workdir / f"{name}-{i}"
            storage.mkdir()
            cmd = alertmanager_command(
                binary, str(config), str(storage), f"127.0.0.1:{web[i]}", gossip[i], gossip[:i],
                peer_timeout=f"{PEER_TIMEOUT}s", gossip_interval="50ms", pushpull_interval="1s",
                extra=["--cluster.probe-interval=200ms", "--cluster.probe-timeout=100ms", "--log.level=debug"],
            )
            api = f"http://127.0.0.1:{web[i]}"
            proc = stack.enter_context(running(cmd, f"{api}/-/ready", workdir / f"{name}-{i}.log"))
            instances.append(Instance(api, proc))
        wait_until(lambda: cluster_ready(instances), 20, "the cluster to settle")
        yield instances


@pytest.fixture(scope="module")
def cluster(workdir: Path, sink: Sink) -> Iterator[list[Instance]]:
    with am_cluster(workdir, sink, "pair") as instances:
        yield instances


def test_alerts_of_one_group_arrive_in_one_notification(sink: Sink, cluster: list[Instance]) -> None:
    post_alerts(cluster, [
        alert("PipelineFailing", "high", "grouped_pipeline", "data-eng", stage="extract"),
        alert("PipelineFailing", "high", "grouped_pipeline", "data-eng", stage="load"),
    ])
    wait_until(lambda: sink.for_pipeline("grouped_pipeline"), DELIVERY, "the notification")
    time.sleep(QUIET)
    [notification] = sink.for_pipeline("grouped_pipeline")
    assert notification["receiver"] == "data-eng-slack"
    assert sorted(a["labels"]["stage"] for a in notification["alerts"]) == ["extract", "load"]


def test_the_same_alert_within_the_repeat_interval_is_delivered_once(sink: Sink, cluster: list[Instance]) -> None:
    firing = [alert("PipelineStale", "medium", "repeat_pipeline", "analytics")]
    post_alerts(cluster, firing)
    wait_until(lambda: sink.for_pipeline("repeat_pipeline"), DELIVERY, "the first notification")
    for _ in range(2):  # Prometheus re-sends firing alerts every evaluation; a group interval passes each time
        time.sleep(2.2)
        post_alerts(cluster, firing)
    time.sleep(2.0 + QUIET)  # the next group interval's flush, and the other instance's
    [notification] = sink.for_pipeline("repeat_pipeline")
    assert notification["receiver"] == "analytics-slack"


def test_a_rate_alert_that_resolves_and_fires_again_within_its_hold_is_notified_once(
        sink: Sink, cluster: list[Instance]) -> None:
    def degraded() -> dict[str, Any]:
        return alert("PipelineSuccessRateLow", "medium", "flapping_pipeline", "analytics")

    post_alerts(cluster, [firing := degraded()])
    wait_until(lambda: sink.for_pipeline("flapping_pipeline"), DELIVERY, "the first notification")
    first = time.monotonic()
    for _ in range(2):  # a success between two failures resolves it; the next failure fires it again
        time.sleep(1.0)
        post_alerts(cluster, [resolved(firing)])
        time.sleep(1.0)
        post_alerts(cluster, [firing := degraded()])
    time.sleep(max(0.0, first + HELD + QUIET - time.monotonic()))  # past the group's next flush
    [notification] = sink.for_pipeline("flapping_pipeline")
    assert notification["status"] == "firing"
    post_alerts(cluster, [resolved(firing)])  # the degradation is over: its resolve is sent at the next flush
    wait_until(lambda: len(sink.for_pipeline("flapping_pipeline")) == 2, HELD + DELIVERY, "the resolved one")
    time.sleep(QUIET)
    assert [n["status"] for n in sink.for_pipeline("flapping_pipeline")] == ["firing", "resolved"]


def test_critical_silences_medium_of_the_same_pipeline_only(sink: Sink, cluster: list[Instance]) -> None:
    post_alerts(cluster, [
        alert("PipelineConsecutiveFailures", "critical", "ledger_reconcile", "finance"),
        alert("PipelineSlow", "medium", "ledger_reconcile", "finance"),
        alert("PipelineSlow", "medium", "invoices_export", "finance"),
    ])
    wait_until(lambda: sink.for_pipeline("ledger_reconcile") and sink.for_pipeline("invoices_export"),
               DELIVERY, "the critical and the other pipeline's medium notifications")
    time.sleep(QUIET)
    [critical] = sink.for_pipeline("ledger_reconcile")
    assert critical["receiver"] == "finance-pager"
    assert [a["labels"]["severity"] for a in critical["alerts"]] == ["critical"]
    [other] = sink.for_pipeline("invoices_export")  # another pipeline: not silenced
    assert other["receiver"] == "finance-slack"


def test_pipeline_less_critical_silences_nothing(sink: Sink, cluster: list[Instance]) -> None:
    # As in rules/pipemon.alerts.yml: team "platform" (not a registry team), no pipeline label.
    post_alerts(cluster, [
        alert("PipelineExporterDown", "critical", team="platform"),
        alert("PipelineEventsRejected", "medium", team="platform"),
    ])
    wait_until(lambda: sink.for_alertname("PipelineEventsRejected"), DELIVERY, "the pipeline-less medium alert")
    time.sleep(QUIET)
    for alertname in ("PipelineExporterDown", "PipelineEventsRejected"):
        [notification] = sink.for_alertname(alertname)
        assert notification["receiver"] == "default"


def test_each_notification_goes_out_once_from_the_pair(sink: Sink, cluster: list[Instance]) -> None:
    pipelines = [f"cdc_table_{i}" for i in range(4)]
    post_alerts(cluster, [alert("PipelineFailing", "critical", p, "data-eng") for p in pipelines])
    for instance in cluster:  # both instances hold the alerts: either one could notify
        with urllib.request.urlopen(f"{instance.api}/api/v2/alerts?filter=alertname=%22PipelineFailing%22") as r:
            held = {a["labels"].get("pipeline") for a in json.load(r)}
        assert set(pipelines) <= held
    wait_until(lambda: all(sink.for_pipeline(p) for p in pipelines), DELIVERY, "one notification per pipeline")
    time.sleep(QUIET)
    for pipeline in pipelines:
        [notification] = sink.for_pipeline(pipeline)
        assert notification["receiver"] == "data-eng-pager"


def test_the_survivor_delivers_after_a_kill(workdir: Path, sink: Sink) -> None:
    with am_cluster(workdir, sink, "kill") as instances:
        post_alerts(instances, [alert("PipelineFailing", "high", "before_kill", "ml-platform")])
        wait_until(lambda: sink.for_pipeline("before_kill"), DELIVERY, "delivery before the kill")
        # Let the notification log gossip reach the other instance first: a kill in the ~100 ms between a
        # notification and its gossip makes the survivor send it again (at least once, not exactly once).
        time.sleep(QUIET)
        assert len(sink.for_pipeline("before_kill")) == 1
        # Kill the instance that notifies first (position 0: the lowest peer name); the other must take over.
        first = min(instances, key=lambda i: i.status()["cluster"]["name"])
        survivor = next(i for i in instances if i is not first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(5)
        post_alerts(instances, [alert("PipelineFailing", "high", "after_kill", "ml-platform")])
        wait_until(lambda: sink.for_pipeline("after_kill"), DELIVERY, "delivery by the survivor")
        time.sleep(QUIET)
        assert survivor.proc.poll() is None
        assert len(sink.for_pipeline("after_kill")) == 1
        assert len(sink.for_pipeline("before_kill")) == 1  # the survivor knew it had been sent
