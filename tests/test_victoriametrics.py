"""VictoriaMetrics, the long-term store of `pipemon stack --ha`, answers as Prometheus does.

A real exporter gets realistic runs (tests/test_grafana.py's two waves: baselines, a slow run, failures, three
failures in a row, an unowned pipeline, a run in progress); a real Prometheus scrapes it every second, evaluates
the repo's rules every second and remote-writes everything (raw scrapes and recorded series) to a real
VictoriaMetrics with the stack's remote_write config. Then every recording-rule expression, every alert
expression and every Grafana panel query is run on both engines at the same evaluation timestamp, and the
answers are compared series by series: the same label sets, values within a relative tolerance.

The differences found (docs/scaling.md has the table), each allowed here in one named place:
- NaN samples: VictoriaMetrics drops them at ingestion; Prometheus' NaN answers are left out and counted
  (without_nan).
- rate()/increase(): VictoriaMetrics does not extrapolate to the window's edges and counts a counter that
  appears with a small value from 0: within 5 % or one increment (WINDOW_RELATIVE, tolerance()).
- float precision: VictoriaMetrics' decimal storage keeps a Unix time to about 1e-6 s (ABSOLUTE).
- newest data: hidden for -search.latencyOffset (30 s by default; 1 s here, and the test waits for its data).
- external labels: stored by VictoriaMetrics as labels. The `replica` label of the stack's Prometheus must be
  dropped on write: with the write relabelling removed once on purpose, 41 of the 118 queries differed here
  (raw series carry it; recorded series with it no longer match aggregates of raw ones).
The two waves are GAP seconds apart so that no dashboard's 1-minute window starts before the exporter's first
samples, where VictoriaMetrics divides rate() by the covered span (docs/scaling.md); the rules' 1h/1d windows
do, and agree within the tolerance above as they use increase().
"""

from __future__ import annotations

import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipemon.stack import local as pstack
from tests import test_grafana as grafana
from tests.procs import REPO, free_port, require_binary, running

VICTORIAMETRICS = pstack.VICTORIAMETRICS
# The same samples and arithmetic: float noise, and VictoriaMetrics' decimal storage of floats, which keeps a
# Unix time to some 1e-6 s (seen: up to 1.4e-6 s on `time() - …_timestamp_seconds`).
RELATIVE, ABSOLUTE = 1e-9, 1e-5
# rate()/increase(): VictoriaMetrics does not extrapolate to the window's edges (Prometheus does, by up to a
# scrape interval: 1/60 of a 1m window at 1 s scrapes), uses the last sample before the window, and counts a
# counter that appears with a small value from 0 (Prometheus needs two samples): within 5 % or one counter
# increment over the window.
WINDOW_RELATIVE = 0.05
RANGE = re.compile(r"\b(rate|increase)\(.*?\[(\d+)([smhd])\]", re.S)
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STEP = 5  # range queries' step, seconds
RANGE_SECONDS = 30  # range queries cover the last 30 s up to the evaluation timestamp
GAP = 100  # seconds between the waves: RANGE_SECONDS + the 1-minute windows + a margin of 10 s

Answer = dict[tuple[tuple[str, str], ...], float]


def rule_exprs() -> list[tuple[str, str]]:
    """(label, expr) of every recording rule and alert in rules/."""
    found = []
    for name in ("pipemon.rules.yml", "pipemon.alerts.yml"):
        for group in yaml.safe_load((REPO / "rules" / name).read_text())["groups"]:
            for i, rule in enumerate(group["rules"]):
                kind = rule.get("record") or rule["alert"]
                found.append((f"{group['name']} / {kind} #{i}", str(rule["expr"])))
    return found


def all_queries() -> list[tuple[str, str]]:
    return rule_exprs() + [(label, expr) for label, expr, _ in grafana.panel_queries()]


LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard / variable, selector, label) of every `label_values(selector, label)` template variable."""
    found = []
    for uid, board in sorted(grafana.committed().items()):
        for variable in board["templating"]["list"]:
            if variable["type"] == "query" and (m := LABEL_VALUES.match(grafana.substitute(str(variable["query"])))):
                found.append((f"{uid} / ${variable['name']}", m.group(1), m.group(2)))
    return found


def label_values(url: str, selector: str, label: str) -> list[str]:
    """What Grafana asks for a `label_values` variable."""
    body = grafana.http_json(f"{url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector}))
    assert body.get("status") == "success", f"{url}: {body}"
    return sorted(body["data"])


def query(url: str, expr: str, t: float) -> Answer:
    """An instant query at `t`; AssertionError if the engine answers with an error."""
    body = grafana.http_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{t:.3f}"}))
    assert body.get("status") == "success", f"{url}: {body}\n    {expr}"
    data = body["data"]
    if data["resultType"] == "scalar":
        return {(("<scalar>", ""),): float(data["result"][1])}
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}


def query_range(url: str, expr: str, start: float, end: float, step: int) -> Answer:
    """A range query, as a Grafana panel sends it: one entry per (series, step)."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)}
    body = grafana.http_json(f"{url}/api/v1/query_range?" + urllib.parse.urlencode(params))
    assert body.get("status") == "success", f"{url}: {body}\n    {expr}"
    return {(*sorted(r["metric"].items()), ("@", str(ts))): float(v) for r in body["data"]["result"]
            for ts, v in r["values"]}


def tolerance(expr: str) -> tuple[float, float]:
    """(relative, absolute) tolerance for `expr`'s values."""
    windows = RANGE.findall(expr)
    if not windows:
        return RELATIVE, ABSOLUTE
    function, amount, unit = windows[0]
    increment = 1.0 if function == "increase" else 1.0 / (int(amount) * SECONDS[unit])
    scale = float(m.group(1)) if (m := re.search(r"\*\s*(\d+)\s*$", expr)) else 1.0  # rate(…) * 60
    return WINDOW_RELATIVE, increment * scale


def differences(prom: Answer, vm: Answer, relative: float = RELATIVE, absolute: float = ABSOLUTE) -> list[str]:
    found = [f"only in Prometheus: {dict(k)} = {prom[k]}" for k in prom.keys() - vm.keys()]
    found += [f"only in VictoriaMetrics: {dict(k)} = {vm[k]}" for k in vm.keys() - prom.keys()]
    for key in prom.keys() & vm.keys():
        a, b = prom[key], vm[key]
        if not math.isclose(a, b, rel_tol=relative, abs_tol=absolute):
            found.append(f"{dict(key)}: Prometheus {a}, VictoriaMetrics {b}")
    return found


def without_nan(answer: Answer) -> tuple[Answer, int]:
    """VictoriaMetrics drops NaN samples at ingestion (a NaN means 'no value' there): Prometheus' NaN answers
    are absent from it, so they are left out of the comparison and counted."""
    kept = {k: v for k, v in answer.items() if not math.isnan(v)}
    return kept, len(answer) - len(kept)


@dataclass
class Tally:
    queries: int = 0  # instant and range queries
    ranges: int = 0
    with_data: int = 0
    series: int = 0
    windowed: int = 0
    loosened: int = 0  # rate/increase queries equal only within their tolerance
    nan_left_out: int = 0
    worst: tuple[float, str] = (0.0, "")  # the largest relative difference beyond the absolute tolerance
    report: list[str] = field(default_factory=list)

    def compare(self, label: str, expr: str, prom: Answer, vm: Answer) -> None:
        prom, nans = without_nan(prom)
        relative, absolute = tolerance(expr)
        found = differences(prom, vm, relative, absolute)
        self.queries += 1
        self.with_data += bool(prom)
        self.series += len(prom)
        self.windowed += relative != RELATIVE
        self.loosened += bool(not found and differences(prom, vm))
        for key in prom.keys() & vm.keys():
            if abs(prom[key] - vm[key]) > absolute:  # let through by the relative tolerance
                gap = abs(prom[key] - vm[key]) / max(abs(prom[key]), abs(vm[key]))
                self.worst = max(self.worst, (gap, f"{label} {dict(key)}: {prom[key]} vs {vm[key]}"))
        self.nan_left_out += nans
        if found:
            self.report.append(f"{label}:\n    {expr}\n    " + "\n    ".join(found[:5]))


def vm_command(tmp: Path, port: int) -> list[str]:
    # latencyOffset: VictoriaMetrics hides the last 30 s by default (data still arriving); the test queries
    # a moment it has waited for. No response cache: every query reads the stored samples.
    return pstack.victoriametrics_command(VICTORIAMETRICS, tmp / "vm", f"127.0.0.1:{port}", "1ms", "1d",
                                          "-search.latencyOffset=1s", "-search.disableCache")


def prometheus_command(tmp: Path, exporter_port: int, prom_port: int, vm: str) -> list[str]:
    """tests/test_grafana.py's Prometheus (the repo's rules every second), as replica a of the stack's HA pair:
    its external label `replica` must not reach VictoriaMetrics (answers with it would differ everywhere)."""
    config_path = grafana.write_prometheus_config(tmp, exporter_port)
    config = yaml.safe_load(config_path.read_text())
    config["global"]["external_labels"] = {"replica": "a"}
    config["remote_write"] = pstack.remote_write_config(vm)
    for queue in config["remote_write"]:
        queue["queue_config"] = {"batch_send_deadline": "1s"}
    config_path.write_text(yaml.safe_dump(config))
    return ["/usr/bin/prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}"]


def wait_written(prom: str, vm: str, t: float, timeout: float = 30) -> None:
    """Until VictoriaMetrics holds as many series at `t` as Prometheus (those not NaN: VictoriaMetrics drops NaN
    samples), and a scrape at `t` or later."""
    count, latest = 'count({__name__=~".+"} >= -Inf)', 'max(timestamp(up{job="pipemon"}))'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if query(vm, count, t) == query(prom, count, t) and query(vm, latest, t + 2) and \
                max(query(vm, latest, t + 2).values()) >= t:
            return
        time.sleep(0.5)
    raise TimeoutError(f"VictoriaMetrics did not catch up with Prometheus at {t} within {timeout}s")


def send_traffic(exporter: str, prom: str) -> None:
    """tests/test_grafana.py's two waves, the second GAP seconds after the first: the dashboards' 1-minute
    windows of the last RANGE seconds then hold data from their start (see WINDOW_RELATIVE) and the second
    wave's runs."""
    grafana.wait_for(prom, 'up{job="pipemon"} == 1', 15)
    assert grafana.http_json(f"{exporter}/api/v1/runs", grafana.first_wave())["results"]
    grafana.http_json(f"{exporter}/api/v1/runs/start", {"pipeline": grafana.DRILL_PIPELINE, "run_id": "od-running"})
    time.sleep(GAP)
    assert grafana.http_json(f"{exporter}/api/v1/runs", grafana.second_wave())["results"]
    rejected = grafana.http_json(f"{exporter}/api/v1/runs", {"pipeline": grafana.DRILL_PIPELINE, "run_id": "bad",
                                                              "status": "maybe"})
    assert rejected.get("http_status", 200) >= 400, rejected
    grafana.wait_for(prom, 'ALERTS{alertname="PipelineConsecutiveFailures",alertstate="firing"}', 20)


@pytest.mark.slow
def test_rules_alerts_and_panels_answer_the_same_on_victoriametrics(tmp_path):
    require_binary("/usr/bin/prometheus")
    require_binary(VICTORIAMETRICS)
    exporter_port, prom_port, vm_port = free_port(), free_port(), free_port()
    exporter, prom, vm = (f"http://127.0.0.1:{p}" for p in (exporter_port, prom_port, vm_port))
    exporter_cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{exporter_port}",
                    "--registry", str(REPO / "pipelines.yaml"), "--state-dir", str(tmp_path / "state")]
    with running(vm_command(tmp_path, vm_port), f"{vm}/health", tmp_path / "vm.log"), \
            running(exporter_cmd, f"{exporter}/-/ready", tmp_path / "exporter.log"), \
            running(prometheus_command(tmp_path, exporter_port, prom_port, vm), f"{prom}/-/ready",
                    tmp_path / "prometheus.log", timeout=30):
        send_traffic(exporter, prom)
        # the first multiple of STEP after the alert was seen: after the scrape that saw the second wave
        t = float(math.ceil((time.time() + 1) / STEP) * STEP)
        time.sleep(max(0.0, t + 3 - time.time()))
        wait_written(prom, vm, t)
        tally = compare_all(prom, vm, t)
        print(f"\n{tally.queries} queries ({tally.ranges} range) compared at {t}, {tally.with_data} with data,"
              f" {tally.series} series (range: series x steps);"
              f" {tally.windowed} rate/increase queries, {tally.loosened} of them equal only within"
              f" {WINDOW_RELATIVE:.0%} or one increment; {tally.nan_left_out} NaN series of Prometheus left out;"
              f" {len(tally.report)} differ")
        variables = variable_queries()
        for name, selector, label in variables:
            assert label_values(prom, selector, label) == label_values(vm, selector, label) != [], name
        print(f"{len(variables)} dashboard variables (label_values) answer the same")
        print(f"largest relative difference let through (past one increment): {tally.worst[0]:.2%} ({tally.worst[1]})")
        assert not tally.report, "\n".join(tally.report)
        assert tally.queries == len(all_queries()) + tally.ranges and tally.ranges >= 30
        # every rule and every panel was found: the rule files hold 12 alerts and the recordings beside them
        assert len(rule_exprs()) >= 20 and len(grafana.panel_queries()) >= 40
        assert tally.with_data >= 60 and tally.series >= 250, tally
        # The comparison can fail: one wrong sample in VictoriaMetrics is seen by the queries that read it.
        corrupt(vm, "pipeline_consecutive_failures", t, job="pipemon", instance=f"127.0.0.1:{exporter_port}",
                pipeline="ledger_reconcile", team="finance")
        broken = compare_all(prom, vm, t).report
        assert broken and all("pipeline_consecutive_failures" in entry for entry in broken), broken
        print(f"with one sample of pipeline_consecutive_failures corrupted: {len(broken)} queries differ")


def compare_all(prom: str, vm: str, t: float) -> Tally:
    """Every query at `t`; every range panel also over the RANGE_SECONDS before `t`, every STEP seconds."""
    tally = Tally()
    for label, expr in all_queries():
        tally.compare(label, expr, query(prom, expr, t), query(vm, expr, t))
    for label, expr, is_range in grafana.panel_queries():
        if is_range:
            tally.ranges += 1
            tally.compare(f"{label} (range)", expr, query_range(prom, expr, t - RANGE_SECONDS, t, STEP),
                          query_range(vm, expr, t - RANGE_SECONDS, t, STEP))
    return tally


def corrupt(vm: str, name: str, t: float, **labels: str) -> None:
    """Write 0 into VictoriaMetrics for one series at `t` (a moment between two scrapes), and wait to see it."""
    selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    request = urllib.request.Request(f"{vm}/api/v1/import/prometheus", data=f"{selector} 0 {int(t * 1000)}\n".encode())
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 204, resp.status
    deadline = time.monotonic() + 20
    while query(vm, selector, t) != {tuple(sorted({"__name__": name, **labels}.items())): 0.0}:
        assert time.monotonic() < deadline, query(vm, selector, t)
        time.sleep(0.5)
