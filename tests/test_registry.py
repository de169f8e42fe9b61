import subprocess
import sys

import pytest

from pipemon.model.registry import THRESHOLD_NAMES, UNOWNED_TEAM, RegistryError, load_registry, parse_registry
from tests.conftest import EXAMPLE_REGISTRY

BASE = "teams:\n  data: {}\n"


def test_example_registry_loads_and_resolves_exact_and_glob_names():
    registry = load_registry(EXAMPLE_REGISTRY)
    assert registry.lookup("orders_daily").team == "data-eng"
    assert registry.lookup("orders_daily").expected_interval_seconds == 86400
    cdc = registry.lookup("cdc_customers")
    assert (cdc.team, cdc.tier, cdc.max_runtime_seconds, cdc.registered) == ("data-eng", "silver", 600, True)
    assert registry.lookup("events_ingest_5m").thresholds == {
        "success_ratio_medium": 0.95, "success_ratio_high": 0.8, "min_runs": 10}
    unknown = registry.lookup("nobody_owns_me")
    assert (unknown.team, unknown.registered) == (UNOWNED_TEAM, False)
    assert {s.name for s in registry.registered_specs()} >= {"orders_daily", "ledger_reconcile"}


def test_exact_name_wins_over_an_earlier_pattern():
    registry = parse_registry(BASE + "  other: {}\npipelines:\n  - {match: 'a*', team: other}\n"
                              "  - {match: abc, team: data}\n")
    assert registry.lookup("abc").team == "data"
    assert registry.lookup("abd").team == "other"


def test_unknown_pipelines_can_be_rejected():
    registry = parse_registry(BASE + "unknown_pipelines: reject\n")
    assert registry.lookup("who") is None


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (BASE + "pipelines:\n  - match: x\n    team: nope\n", 5, "team `nope`"),
    (BASE + "pipelines:\n  - match: x\n    team: data\n    max_runtime: 3q\n", 4, "duration"),
    (BASE + "pipelines:\n  - match: x\n    team: data\n    thresholds:\n      min_runs: 0\n", 7, "min_runs"),
    (BASE + "pipelines:\n  - match: x\n    team: data\n    thresholds:\n      sucess_ratio_high: 0.1\n", 7,
     "sucess_ratio_high"),
    (BASE + "pipelines:\n  - match: x\n    team: data\n  - match: x\n    team: data\n", 6, "listed twice"),
    (BASE + "pipelines:\n  - match: x\n    team: unowned\n", 4, "reserved"),
    ("teams:\n  Bad Name: {}\n", 2, "Bad Name"),
    ("teams: [\n", 2, "invalid YAML"),
    ("- just a list\n", 1, "mapping"),
])
def test_errors_name_the_line(text, line, fragment):
    with pytest.raises(RegistryError) as err:
        parse_registry(text, "reg.yaml")
    assert str(err.value).startswith(f"reg.yaml:{line}:"), str(err.value)
    assert fragment in str(err.value)


def test_threshold_names_are_the_documented_ones():
    assert THRESHOLD_NAMES == (
        "success_ratio_medium", "success_ratio_high", "duration_zscore_medium", "duration_zscore_high",
        "duration_ratio_min", "duration_ratio_high",
        "throughput_ratio_high", "throughput_zscore_high", "volume_zscore_high", "volume_ratio_high",
        "failed_runs_low",
        "consecutive_failures_critical", "failing_seconds_critical", "min_runs", "min_baseline_samples",
        "stale_grace_factor")


def test_check_config_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipemon.cli", "check-config", str(EXAMPLE_REGISTRY)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK: 4 teams" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "pipelines:\n  - match: x\n    team: ghost\n")
    failed = subprocess.run([sys.executable, "-m", "pipemon.cli", "check-config", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{bad}:5:" in failed.stderr and "ghost" in failed.stderr
