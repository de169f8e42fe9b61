"""docker-compose.yml, the Dockerfile and deploy/prometheus.yml: valid for the real tools, every mounted repo path
exists, images pinned, healthchecks, state in named volumes, Prometheus wired to the exporter and both
Alertmanagers; the `ha` profile (deploy/prometheus-ha.yml) wired as `pipemon stack --ha` is. No container runs
here: `docker-compose config` validates without an engine."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipemon.stack import local as pstack
from tests.procs import REPO, require_binary

COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
PROMETHEUS_HA_CONFIG = REPO / "deploy" / "prometheus-ha.yml"
ALERTMANAGERS = ("alertmanager-1", "alertmanager-2")
PAIR = {"prometheus-a": "a", "prometheus-b": "b"}
DEFAULT_SERVICES = {"exporter", "prometheus", "alertmanager-1", "alertmanager-2", "sink", "grafana"}
HA_SERVICES = {"postgres", "exporter-1", "exporter-2", "exporter-ha", *PAIR, "victoriametrics"}
STATE = {"exporter": "/var/lib/pipemon", "prometheus": "/prometheus", "alertmanager-1": "/alertmanager",
         "alertmanager-2": "/alertmanager", "grafana": "/var/lib/grafana", "postgres": "/var/lib/postgresql/data",
         "prometheus-a": "/prometheus", "prometheus-b": "/prometheus",
         "victoriametrics": "/victoria-metrics-data"}
PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)?$")  # PostgreSQL's releases are major.minor


def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def mounts(service: str) -> dict[str, str]:
    """Container path → source (a ./repo path or a named volume) for one service."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in services()[service].get("volumes", [])}


def command_flags(service: str) -> dict[str, str]:
    return dict(flag.lstrip("-").split("=", 1) for flag in services()[service]["command"] if "=" in flag)


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


def prometheus_ha_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_HA_CONFIG.read_text())


@pytest.mark.parametrize("profile", [[], ["--profile", "demo"], ["--profile", "ha"]], ids=["default", "demo", "ha"])
def test_docker_compose_config_validates(profile):
    binary = require_binary("docker-compose")
    result = subprocess.run([binary, "-f", str(COMPOSE_FILE), *profile, "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_mounted_repo_path_exists():
    missing = [f"{name}: {source}" for name in services() for source in mounts(name).values()
               if source.startswith(".") and not (REPO / source).exists()]
    assert not missing, missing


def test_images_are_pinned():
    for name, service in services().items():
        if "build" in service:
            continue
        tag = service["image"].rpartition(":")[2]
        assert PINNED_TAG.match(tag), f"{name}: {service['image']} is not pinned to a release"


def test_every_long_running_service_has_a_healthcheck():
    for name, service in services().items():
        check = service.get("healthcheck", {})
        if "demo" in service.get("profiles", []):
            continue
        assert check.get("test") and not check.get("disable"), name


def test_state_lives_in_named_volumes():
    named = set(yaml.safe_load(COMPOSE_FILE.read_text())["volumes"])
    for name, path in STATE.items():
        assert mounts(name).get(path) in named, f"{name}: {path} is not a named volume"


def test_alertmanagers_are_clustered_with_each_other():
    for name in ALERTMANAGERS:
        (other,) = set(ALERTMANAGERS) - {name}
        flags = command_flags(name)
        assert flags["cluster.peer"] == f"{other}:9094", name
        assert flags["config.file"] == "/etc/alertmanager/alertmanager.yml"
        assert mounts(name)[flags["config.file"]] == "./alertmanager/alertmanager.yml"
        assert mounts(name)["/etc/alertmanager/templates"] == "./alertmanager/templates"


def test_exporter_serves_the_mounted_registry_into_its_state_volume():
    command = services()["exporter"]["command"]
    assert command[:2] == ["pipemon", "serve"]
    args = dict(zip(command[2::2], command[3::2], strict=True))
    assert args["--listen"] == "0.0.0.0:9464"
    assert mounts("exporter")[args["--registry"]] == "./pipelines.yaml"
    assert args["--state-dir"] == STATE["exporter"]


def test_the_default_stack_is_unchanged_and_the_ha_set_is_a_profile():
    by_profile = {name: service.get("profiles", []) for name, service in services().items()}
    assert {name for name, profiles in by_profile.items() if not profiles} == DEFAULT_SERVICES
    assert {name for name, profiles in by_profile.items() if profiles == ["ha"]} == HA_SERVICES


def test_demo_is_an_optional_profile_aimed_at_the_exporter():
    demo = services()["demo"]
    assert demo["profiles"] == ["demo"]
    assert demo["command"][:3] == ["python", "-m", "pipemon.stack.demo"]
    assert "http://exporter:9464" in demo["command"]


def test_every_python_module_the_stack_runs_exists():
    for name, service in services().items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: {command[2]}"


# ---- deploy/prometheus.yml -----------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_exporter_as_job_pipemon():
    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    targets = [t for config in jobs["pipemon"]["static_configs"] for t in config["targets"]]
    assert targets == ["exporter:9464"]


def test_prometheus_loads_the_mounted_rules_directory():
    (pattern,) = prometheus_config()["rule_files"]
    directory = str(Path(pattern).parent)
    assert mounts("prometheus")[directory] == "./rules"
    assert list((REPO / "rules").glob(Path(pattern).name)), "no rule file matches"
    assert mounts("prometheus")["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"


def test_prometheus_alerts_both_alertmanagers_directly():
    (alertmanagers,) = prometheus_config()["alerting"]["alertmanagers"]
    targets = [t for config in alertmanagers["static_configs"] for t in config["targets"]]
    assert sorted(targets) == [f"{name}:9093" for name in ALERTMANAGERS]
    assert set(ALERTMANAGERS) <= set(services())


# ---- the `ha` profile and deploy/prometheus-ha.yml ------------------------------------------------------


def test_prometheus_ha_config_passes_promtool():
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_HA_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_ha_config_is_the_stacks_ha_config():
    """The relabelling that makes the pair one (alerts, remote_write) is pipemon.stack.local's, and so are the jobs."""
    vm = f"http://victoriametrics:{command_flags('victoriametrics')['httpListenAddr'].rsplit(':', 1)[1]}"
    stack = pstack.prometheus_config(pstack.StackPorts(), Path("/etc/prometheus/rules"), "15s", "15s",
                                     replica="a", remote_write=vm)
    ha = prometheus_ha_config()
    assert ha["remote_write"] == stack["remote_write"]
    assert ha["alerting"]["alert_relabel_configs"] == stack["alerting"]["alert_relabel_configs"]
    assert set(ha["global"]["external_labels"]) == set(stack["global"]["external_labels"]) == {"replica"}
    assert ha["rule_files"] == stack["rule_files"]
    assert [job["job_name"] for job in ha["scrape_configs"]] == [job["job_name"] for job in stack["scrape_configs"]]


def test_prometheus_pair_runs_one_file_told_apart_by_replica():
    assert prometheus_ha_config()["global"]["external_labels"]["replica"] == "${REPLICA}"
    for name, replica in PAIR.items():
        service = services()[name]
        assert service["environment"]["REPLICA"] == replica
        assert "--enable-feature=expand-external-labels" in service["command"]
        assert mounts(name)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus-ha.yml"
        assert mounts(name)["/etc/prometheus/rules"] == "./rules"
    (alertmanagers,) = prometheus_ha_config()["alerting"]["alertmanagers"]
    assert sorted(t for c in alertmanagers["static_configs"] for t in c["targets"]) == \
        [f"{name}:9093" for name in ALERTMANAGERS]
    # Each scrapes both by name: with `replica` dropped on remote_write, `localhost:9090` from a and from b would
    # be one series in VictoriaMetrics holding two servers' counters, alternating.
    jobs = {job["job_name"]: job for job in prometheus_ha_config()["scrape_configs"]}
    assert sorted(t for c in jobs["prometheus"]["static_configs"] for t in c["targets"]) == \
        [f"{name}:9090" for name in sorted(PAIR)]


def test_victoriametrics_deduplicates_the_pair_at_its_scrape_interval():
    flags = command_flags("victoriametrics")
    assert flags["dedup.minScrapeInterval"] == prometheus_ha_config()["global"]["scrape_interval"]
    assert flags["storageDataPath"] in mounts("victoriametrics")
    assert flags["retentionPeriod"]


def test_replicas_share_postgres_behind_the_balancer_that_the_pair_scrapes():
    for name in ("exporter-1", "exporter-2"):
        command = " ".join(services()[name]["command"])
        assert "pipemon serve --listen 0.0.0.0:9464" in command and "@postgres:5432/pipemon" in command, name
    balancer = services()["exporter-ha"]["command"]
    assert balancer[:3] == ["python", "-m", "pipemon.stack.balancer"]
    assert [balancer[i + 1] for i, arg in enumerate(balancer) if arg == "--upstream"] == \
        ["http://exporter-1:9464", "http://exporter-2:9464"]
    jobs = {job["job_name"]: job for job in prometheus_ha_config()["scrape_configs"]}
    assert [t for c in jobs["pipemon"]["static_configs"] for t in c["targets"]] == ["exporter-ha:9464"]


def test_the_image_installs_the_postgresql_driver():
    assert "'/src[postgres]'" in dict(dockerfile_instructions())["RUN"]


# ---- Dockerfile ------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_the_exporter_as_a_non_root_user_with_a_healthcheck():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    values = dict(instructions)
    assert values["FROM"] == "python:3.11-slim"
    assert values["USER"] not in ("root", "0")
    assert "HEALTHCHECK" in keywords and "/-/healthy" in values["HEALTHCHECK"]
    assert "pip install" in values["RUN"]
    assert "pipemon serve --listen 0.0.0.0:9464 --registry /etc/pipemon/pipelines.yaml" in \
        " ".join(re.findall(r'"([^"]*)"', values["CMD"]))


def test_dockerignore_lets_in_what_the_install_needs():
    lines = (REPO / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "exporter/", "pipelines.yaml", "rules/config.yaml"):  # the UI loads the last
        assert f"!{needed}" in lines and (REPO / needed).exists(), needed
