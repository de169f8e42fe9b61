"""bench/prometheus_cost.py runs end to end at tiny sizes and prints a complete, sane table (so it cannot rot)."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.procs import REPO, require_binary

SIZES = (30, 120)


def _groups(rules_dir):
    return {g["name"] for f in sorted(rules_dir.glob("pipemon.*.yml")) for g in yaml.safe_load(f.read_text())["groups"]}


@pytest.mark.slow
def test_quick_run_prints_every_group_and_figures_grow_with_n(tmp_path):
    require_binary("/usr/bin/prometheus")
    require_binary("/usr/bin/promtool")
    out_json = tmp_path / "figures.json"
    # The landed rules on the landed exporter, at 5 s intervals: about two minutes per size.
    cmd = [sys.executable, str(REPO / "bench" / "prometheus_cost.py"), "--pipelines", ",".join(map(str, SIZES)),
           "--rules-dir", str(tmp_path / "none"), "--history", "2h", "--history-step", "60s",
           "--evaluation-interval", "5s", "--scrape-interval", "5s", "--measure-minutes", "0.4",
           "--min-evaluations", "3", "--exporter-rev", "7c93d63", "--json", str(out_json)]
    (tmp_path / "none").mkdir()
    landed = tmp_path / "landed"
    landed.mkdir()
    for name in ("pipemon.rules.yml", "pipemon.alerts.yml"):
        (landed / name).write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"7c93d63:rules/{name}"],
                                                   capture_output=True, check=True).stdout)
    cmd[cmd.index("--rules-dir") + 1] = str(landed)  # the same files as --rules-rev: measured once
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "measuring them once" in out.stderr

    figures = json.loads(out_json.read_text())
    assert [r["pipelines"] for r in figures] == list(SIZES)
    groups = _groups(landed)
    for result in figures:
        assert {g["name"] for g in result["groups"]} == groups
        for group in result["groups"]:
            assert len(group["durations"]) >= 3 and all(d > 0 for d in group["durations"]), group
            assert group["interval"] == 5 and group["missed"] >= 0
            assert len(group["rule_times"]) == sum(
                len(g["rules"]) for f in landed.glob("*.yml") for g in yaml.safe_load(f.read_text())["groups"]
                if g["name"] == group["name"])
        assert result["rss_bytes"] > 20 * 2**20
        assert result["backfilled_series"] > 0 and "pipeline_runs_total" in result["backfill"]
    small, large = figures
    assert large["head_series"] > 3 * small["head_series"]  # 4x the pipelines: head series grow with N
    assert 25 < large["head_series"] / large["pipelines"] < 80  # ~39 exporter series + recordings per pipeline

    # The printed report: one section per size, every group in it, the summary and the targets.
    for n in SIZES:
        section = out.stdout.split(f"## {n:,} pipelines")[1].split("## ")[0]
        for name in groups:
            assert re.search(rf"^\| {re.escape(name)} \| 5 s \| \d+ \| [\d.]+ s \|", section, re.M), (name, section)
        assert "heaviest rules" in section and "head series" in section
        assert re.search(rf"^\| {n:,} \| landed \(7c93d63\) \| [\d,]+ \|", out.stdout, re.M)
    assert "## targets" in out.stdout and "rule time per pipeline at 120 ÷ at 30" in out.stdout
