"""The dashboard windows derived from the recorded runs counter give the landed rules' answers, on a real Prometheus.

A day of `pipeline_runs_total` history (every 60 s, off the 5-minute grid; failures, a counter reset) is
backfilled; the recorded counter (the first rule of the rendered `pipemon.dashboards` group) is evaluated
over it by `promtool tsdb create-blocks-from rules`, as Prometheus would have recorded it every 5 minutes;
at its last recording, each derived rule of the group (the earlier recordings of the round written out) is
compared with the landed expression (1-day and 1-hour windows over the raw counter) on the same data.

Prometheus offsets a group's rounds by a hash of its name and file, so a window of the recorded counter
starts at the scrape before its edge and the landed window at the scrape after it: a run between the two
counts in one and not the other. No pipeline runs more often than every 5 minutes, so that is at most one
run per pipeline and window; the comparison allows exactly the runs so moved, and nothing else.
"""

from __future__ import annotations

import random
import re
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.procs import REPO, require_binary

sys.path.insert(0, str(REPO / "bench"))
import prometheus_cost as bench
import prometheus_cost_rules as bench_rules

GRID = 300  # the dashboards group's interval (rules/config.yaml dashboard_interval)
STEP = 60
HOURS = 26
LABELS = 'job="pipemon",instance="exporter:9464"'
RECORDED = "pipeline_team_status:pipeline_runs_total:sum"
RAW = "sum by (pipeline, team) ({fn}(pipeline_runs_total{{job=\"pipemon\"{m}}}[{w}]))"
SUCCESS = ',status="success"'
# The landed rules (7c93d63), written out: what the recordings must keep answering.
LANDED = {
    **{f"pipeline_team:pipeline_runs:increase{w}": RAW.format(fn="increase", m="", w=w) for w in ("1h", "1d")},
    **{f"pipeline_team:pipeline_runs:ratio_rate{w}":
       f"{RAW.format(fn='rate', m=SUCCESS, w=w)} / ({RAW.format(fn='rate', m='', w=w)} > 0)"
       for w in ("1h", "1d")},
    **{f"team:pipeline_runs:ratio_rate{w}":
       f'sum by (team) (rate(pipeline_runs_total{{job="pipemon",status="success"}}[{w}]))'
       f' / (sum by (team) (rate(pipeline_runs_total{{job="pipemon"}}[{w}])) > 0)' for w in ("1h", "1d")},
}


def _history(start: float, end: float) -> dict[tuple[str, str, str], list[tuple[float, int]]]:
    """(pipeline, team, status) -> (time, counter value) every STEP seconds, 7 s off the grid; each pipeline
    runs at its own second of its period."""
    rng = random.Random(12)
    periods = [300, 900, 3600, 3600, 86400 // 4, 86400]
    series: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for index in range(18):
        pipeline, team, period = f"p{index}", f"team{index % 3}", periods[index % len(periods)]
        fail_share = 0.4 if index % 5 == 0 else 0.05
        phase = rng.randrange(period)
        runs = [t + phase for t in range(int(start), int(end) - phase, period) if rng.random() > 0.02]
        outcome = {t: rng.random() > fail_share for t in runs}
        reset = start + 12 * 3600 if index == 7 else None  # p7's exporter loses its counters at noon
        for status in ("success", "failure"):
            points, value = [], 0
            t = start + 7
            pending = iter(sorted(runs))
            nxt = next(pending, None)
            while t < end:
                while nxt is not None and nxt <= t:
                    value += (outcome[nxt] == (status == "success"))
                    nxt = next(pending, None)
                if reset is not None and t >= reset:
                    value, reset = 0, None
                points.append((t, value))
                t += STEP
            series[(pipeline, team, status)] = points
    return series


def _write_openmetrics(series: dict, directory: Path) -> list[Path]:
    files: dict[int, list[str]] = {}
    for (pipeline, team, status), points in series.items():
        prefix = f'pipeline_runs_total{{{LABELS},pipeline="{pipeline}",team="{team}",status="{status}"}} '
        for t, value in points:
            files.setdefault(int(t // 7200), []).append(f"{prefix}{value} {t:.3f}\n")
    paths = []
    for block, lines in sorted(files.items()):
        path = directory / f"history-{block}.om"
        path.write_text("# TYPE pipeline_runs_total gauge\n" + "".join(lines) + "# EOF\n")
        paths.append(path)
    return paths


def _dashboard_rules() -> list[dict]:
    groups = yaml.safe_load((REPO / "rules" / "pipemon.rules.yml").read_text())["groups"]
    (group,) = [g for g in groups if g["name"] == "pipemon.dashboards"]
    assert bench_rules.seconds(group["interval"]) == GRID
    return group["rules"]


def _inlined(rules: list[dict]) -> dict[str, str]:
    """record -> its expression with the group's earlier recordings written out: what the rule computes
    when the group evaluates at that moment (a rule sees the earlier rules' results of the same round)."""
    exprs: dict[str, str] = {}
    for rule in rules:
        expr = str(rule["expr"])
        for name, earlier in exprs.items():
            if name != RECORDED:
                expr = re.sub(rf"\b{re.escape(name)}\b", f"({earlier})", expr)
        exprs[rule["record"]] = expr
    return exprs


def _at(prom: str, expr: str, t: float) -> dict[tuple, float]:
    answer = bench.get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{t:.3f}"}))
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["data"]["result"]}


def _moved_runs(landed: float, recorded: float) -> int:
    """Runs one window counts and the other not: the increases differ by whole runs and by the landed
    window's extrapolation (one scrape interval in 59, under 2 %)."""
    moved = round(abs(recorded - landed))
    assert moved <= 1 and abs(abs(recorded - landed) - moved) <= 0.02 * landed, (landed, recorded)
    return moved


def _allowed_difference(name: str, key: tuple, counts: dict[tuple, tuple[float, float]]) -> float:
    """How far the recorded answer may be from the landed one: the moved runs, and for a ratio of n runs
    1/n for each of them (one run more or less moves s/n by at most that)."""
    if ":increase" in name:
        landed, recorded = counts[key]
        return _moved_runs(landed, recorded) + 0.02 * landed
    team = dict(key)["team"]
    pipelines = [key] if name.startswith("pipeline_team:") else [k for k in counts if dict(k)["team"] == team]
    moved = sum(_moved_runs(*counts[k]) for k in pipelines)
    runs = min(sum(counts[k][0] for k in pipelines), sum(counts[k][1] for k in pipelines))
    return moved / runs + 0.005


@pytest.mark.slow
def test_recorded_dashboard_windows_answer_as_the_landed_rules(tmp_path):
    require_binary(bench.PROMETHEUS)
    require_binary(bench.PROMTOOL)
    end = (time.time() // GRID) * GRID - GRID
    start = end - HOURS * 3600
    (tmp_path / "data").mkdir()
    bench.history.create_blocks(_write_openmetrics(_history(start, end + 1), tmp_path), tmp_path / "data",
                                bench.PROMTOOL)
    config = bench.prometheus_config(None, [], "15s", 60)
    with bench.prometheus(tmp_path, config, "prometheus") as (prom, proc):
        rules = _dashboard_rules()
        group = {"name": "pipemon.dashboards", "interval": f"{GRID}s", "rules": [rules[0]]}
        assert rules[0]["record"] == RECORDED
        bench.backfill_recorded(tmp_path, prom, proc, bench_rules.HistoryPlan(set(), [[group]], {}),
                                start + 3600, end)
        # the group's last round: when the counter was last recorded
        (t,) = _at(prom, f"max(timestamp({RECORDED}))", end).values()
        exprs = _inlined(rules)
        counts: dict[str, dict[tuple, tuple[float, float]]] = {}  # window -> pipeline -> (landed, recorded)
        checked = 0
        for name, landed in LANDED.items():
            old, new = _at(prom, landed, t), _at(prom, exprs[name], t)
            assert set(new) == set(old) and old, (name, sorted(set(old) ^ set(new)))
            window = name[-2:]
            if ":increase" in name:
                counts[window] = {key: (value, new[key]) for key, value in old.items()}
            for key, value in old.items():
                allowed = _allowed_difference(name, key, counts[window])
                assert abs(new[key] - value) <= allowed, (name, key, value, new[key], allowed)
                checked += 1
        # the windows are not trivially equal: a day holds more runs than an hour, failures lower the ratios
        day = _at(prom, exprs["pipeline_team:pipeline_runs:increase1d"], t)
        hour = _at(prom, exprs["pipeline_team:pipeline_runs:increase1h"], t)
        assert sum(day.values()) > 10 * sum(hour.values()) > 0
        assert min(_at(prom, exprs["team:pipeline_runs:ratio_rate1d"], t).values()) < 0.95
        assert checked > 70
