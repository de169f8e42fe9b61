"""bench/detection.py runs end to end on a tiny fleet (so it cannot rot): outages and zero-record runs are
detected by the project's rules, and missed by the same rules rendered with thresholds nothing can reach."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.procs import REPO, require_binary

TINY = ["--pipelines", "8", "--days", "5", "--warmup-days", "3", "--incident-types", "outage,zero_records",
        "--per-type", "2"]


def run_bench(tmp_path: Path, name: str, *extra: str) -> dict:
    out_json = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(REPO / "bench" / "detection.py"), *TINY, "--json", str(out_json), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "| target | measured |" in done.stdout and "false alerts per pipeline-month" in done.stdout
    return json.loads(out_json.read_text())


def unreachable_rules(tmp_path: Path) -> Path:
    """The project's rules rendered from a config whose failure and volume thresholds cannot be reached."""
    config = yaml.safe_load((REPO / "rules" / "config.yaml").read_text())
    config["thresholds"].update(consecutive_failures_critical=1000, success_ratio_medium=0.0,
                                success_ratio_high=0.0, volume_zscore_high=1e9, volume_ratio_high=0.0)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "unreachable"
    subprocess.run([str(Path(sys.executable).parent / "pipemon"), "render-rules", "--config", str(config_path),
                    "--out-dir", str(out_dir)], check=True, capture_output=True)
    return out_dir


@pytest.mark.slow
def test_a_tiny_fleet_is_scored_and_impossible_thresholds_miss_everything(tmp_path: Path) -> None:
    require_binary("/usr/bin/prometheus")
    require_binary("/usr/bin/promtool")
    result = run_bench(tmp_path, "tree")
    incidents = result["incidents"]
    assert {i["type"] for i in incidents} == {"outage", "zero_records"} and len(incidents) == 4
    assert all(i["detected"] for i in incidents), incidents
    for i in incidents:
        assert 0 <= i["delay_seconds"] <= 3 * i["interval"] + 1800, i  # about a run or three, not a day
        assert i["notifications"] >= 1
    assert result["pipeline_months"] > 0 and result["feed"]["rejected"] == 0

    check_replays(tmp_path / "tree.json", result)

    missed = run_bench(tmp_path, "unreachable", "--rules-dir", str(unreachable_rules(tmp_path)))
    assert len(missed["incidents"]) == 4 and not any(i["detected"] for i in missed["incidents"]), missed


def replay(run_json: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "detection_replay.py"), str(run_json), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def check_replays(run_json: Path, run: dict) -> None:
    """bench/detection_replay.py gives the run's own figures back, and a longer keep_firing_for shows."""
    same_json = run_json.with_name("same.json")
    done = replay(run_json, "--json", str(same_json))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(same_json.read_text())["incidents"] == run["incidents"]

    held_json = run_json.with_name("held.json")
    done = replay(run_json, "--keep-firing-for", "PipelineConsecutiveFailures=6h", "--json", str(held_json))
    assert done.returncode == 0, done.stderr[-3000:]
    held = {(i["pipeline"], i["start"]): i["linger_seconds"] for i in json.loads(held_json.read_text())["incidents"]}
    outages = [i for i in run["incidents"] if i["type"] == "outage"]
    assert max(held[i["pipeline"], i["start"]] - (i["linger_seconds"] or 0) for i in outages) > 3600, held

    shorter = replay(run_json, "--keep-firing-for", "PipelineConsecutiveFailures=0s")
    assert shorter.returncode != 0 and "cannot undo" in shorter.stderr, shorter.stderr


def run_offline(tmp_path: Path, name: str, config: Path) -> dict:
    out_json = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(REPO / "bench" / "detection_offline.py"), "--seeds", "3", "--end", "1764000000",
           "--pipelines", "8", "--days", "6", "--warmup-days", "3", "--incident-types", "volume_drop,zero_records",
           "--per-type", "2", "--config", str(config), "--json", str(out_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| seed | false slow per pipeline-month |" in done.stdout
    return json.loads(out_json.read_text())["3"]


def test_the_offline_check_judges_with_the_config_it_is_given(tmp_path: Path) -> None:
    """bench/detection_offline.py: the project's thresholds catch the volume drops and zero-record runs, the
    same config with a volume threshold nothing reaches catches none (so the figures come from the config)."""
    caught = run_offline(tmp_path, "tree", REPO / "rules" / "config.yaml")
    assert caught["recall"]["volume_drop"] == [2, 2] and caught["recall"]["zero_records"] == [2, 2], caught
    config = yaml.safe_load((REPO / "rules" / "config.yaml").read_text())
    config["thresholds"].update(volume_zscore_high=1e9)
    unreachable = tmp_path / "config.yaml"
    unreachable.write_text(yaml.safe_dump(config))
    missed = run_offline(tmp_path, "unreachable", unreachable)
    assert missed["recall"]["volume_drop"] == [0, 2] and missed["recall"]["zero_records"] == [0, 2], missed
    assert missed["false"]["volume_low"] == 0
